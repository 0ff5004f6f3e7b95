"""Framework-free credential cryptography: keys, kid, COSE/CWT, Base45, JWK.

Nothing here imports Litestar, SQLAlchemy or the app: an offline verifier needs only this
package and the issuers' JWKS.
"""
