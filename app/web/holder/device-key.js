// The device key: an Ed25519 key pair made in this browser, whose public half is bound to the eCard at
// activation. The private half never leaves the browser.
//
// 1. WebCrypto Ed25519 (current Chrome, Edge, Firefox and Safari): a non-extractable CryptoKey, kept in
//    IndexedDB. Script on the page can use it but cannot read it out.
// 2. Fallback, where WebCrypto has no Ed25519 (older browsers): the vendored @noble/ed25519, with its
//    seed from crypto.getRandomValues kept in IndexedDB. It works the same for the server, but the seed
//    is ordinary data to the page, so the page says which kind it made.
// Neither works without a secure context (https, or http://localhost / 127.0.0.1): browsers only give
// pages WebCrypto there, and the page asks for one instead of inventing a weaker key.

const DB_NAME = "ecard-holder";
const STORE = "keys";
const RECORD = "device";

function openDb() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE);
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

async function transact(mode, work) {
  const db = await openDb();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction(STORE, mode);
      const request = work(tx.objectStore(STORE));
      tx.oncomplete = () => resolve(request?.result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  } finally {
    db.close();
  }
}

export function base64url(bytes) {
  let binary = "";
  for (const byte of new Uint8Array(bytes)) binary += String.fromCharCode(byte);
  return btoa(binary).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

/** Why no device key can be made here, or null when one can. */
export function unsupportedReason() {
  if (!window.isSecureContext || !globalThis.crypto?.subtle) {
    return "此页面需通过 HTTPS 或 localhost 打开 · Open this page over HTTPS (or on localhost): browsers only give secure pages the cryptography a device key needs.";
  }
  if (!globalThis.indexedDB) return "浏览器不支持本地存储 · This browser cannot store a device key (IndexedDB).";
  return null;
}

async function webCryptoKey() {
  try {
    const pair = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
    const raw = await crypto.subtle.exportKey("raw", pair.publicKey);
    return { kind: "webcrypto", privateKey: pair.privateKey, publicKey: base64url(raw) };
  } catch (error) {
    if (error?.name === "NotSupportedError" || error?.name === "TypeError" || error?.name === "SyntaxError") return null;
    throw error;
  }
}

async function fallbackKey() {
  const ed = await import("/web/vendor/noble-ed25519.js");
  const { secretKey, publicKey } = await ed.keygenAsync();
  return { kind: "noble", privateKey: secretKey, publicKey: base64url(publicKey) };
}

/** A new key pair: { kind: "webcrypto" | "noble", privateKey, publicKey (base64url of the 32-byte key) }. */
export async function createDeviceKey() {
  const reason = unsupportedReason();
  if (reason) throw new Error(reason);
  return (await webCryptoKey()) || fallbackKey();
}

/** Keep the key pair once the server accepted it (replacing an earlier one). */
export async function storeDeviceKey(key) {
  await transact("readwrite", (store) => store.put({ ...key, createdAt: Date.now() }, RECORD));
}

/** The stored key pair, or undefined. */
export async function loadDeviceKey() {
  if (!globalThis.indexedDB) return undefined;
  return transact("readonly", (store) => store.get(RECORD));
}

/** Forget the key (sign-out on this device). */
export async function forgetDeviceKey() {
  if (!globalThis.indexedDB) return;
  await transact("readwrite", (store) => store.delete(RECORD));
}

/** Sign bytes with the device key (the DPoP proofs below). */
export async function signWithDeviceKey(key, bytes) {
  if (key.kind === "webcrypto") return new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, key.privateKey, bytes));
  const ed = await import("/web/vendor/noble-ed25519.js");
  return ed.signAsync(bytes, key.privateKey);
}

const encoder = new TextEncoder();

function jsonPart(value) {
  return base64url(encoder.encode(JSON.stringify(value)));
}

/**
 * A DPoP proof (RFC 9449) for one request, new each time: the device key proves that this phone sends
 * it. `url` is the request's (relative to this page or absolute); its query is not part of the proof.
 * With `accessToken`, the proof carries its hash (`ath`), binding the two together. `nowMs` is the
 * service's time (its clock decides whether the proof is fresh), by default this device's.
 */
export async function dpopProof(key, method, url, accessToken, nowMs = Date.now()) {
  const target = new URL(url, window.location.href);
  const header = { typ: "dpop+jwt", alg: "EdDSA", jwk: { kty: "OKP", crv: "Ed25519", x: key.publicKey } };
  const claims = {
    jti: base64url(crypto.getRandomValues(new Uint8Array(16))),
    htm: method.toUpperCase(),
    htu: `${target.origin}${target.pathname}`,
    iat: Math.floor(nowMs / 1000),
  };
  if (accessToken) claims.ath = base64url(await crypto.subtle.digest("SHA-256", encoder.encode(accessToken)));
  const input = `${jsonPart(header)}.${jsonPart(claims)}`;
  const signature = await signWithDeviceKey(key, encoder.encode(input));
  return `${input}.${base64url(signature)}`;
}
