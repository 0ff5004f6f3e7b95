"""Framework-free credential cryptography: keys, kid, COSE/CWT, Base45, JWK, status lists.

Nothing here imports Litestar, SQLAlchemy or the app: an offline verifier needs only this
package, the issuers' JWKS and their signed status lists (crypto/offline.py).
"""
