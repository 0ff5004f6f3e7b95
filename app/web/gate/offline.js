// Offline verification in the gate console: a region's kit (GET /v1/offline-kits/{region}: its JWKS and
// its signed period) decides a scan in the browser, with crypto/offline.py's rules. Codes are unlinkable
// (crypto/seal.py): the card reference is sealed per code and there is no status index, so the kit names
// no card and the decision is the code's signature and window and the kit's freshness; the card's status
// is the issuer's to enforce (README, "Offline gates").
//
// The key is chosen by the code's kid in the kit, and the key decides the algorithm: an Ed25519 key
// verifies with EdDSA (the vendored @noble/ed25519), an SM2 key with SM2/SM3 and the default signer ID
// (the vendored sm-crypto-v2). A header that names another algorithm than the kid's key's is refused
// (bad_signature) before any signature check, so a kid bound to an Ed25519 key never verifies an SM2
// signature, nor the reverse. The protected header must be byte for byte the one the issuer writes
// (crypto/cose.py); loading a kit checks every kid against its key's thumbprint (SHA-256 for Ed25519,
// SM3 for SM2, crypto/jwk.py) and the status list's signature, region and structure.
//
// What a gate cannot know alone (crypto/offline.py): replays at other gates. This console refuses a
// code it accepted before (`replayed`) until the code has expired; the server sees the rest when the
// gate uploads its scans.

const NOBLE_URL = "/web/vendor/noble-ed25519.js";
const SM_URL = "/web/vendor/sm-crypto-v2.js";
export const ALG_EDDSA = -8;
export const ALG_SM2_SM3 = -65538; // private use (RFC 9052 §16.4): COSE has no registered SM2 value
const PREFIX = "EC1:";
const MAX_TEXT_LENGTH = 512;
const STATUS_LIST_TYP = "application/statuslist+cwt";
const SM2_SIGNER_ID = "1234567812345678"; // GM/T 0009-2012: the ID when none is agreed
export const DEFAULT_LEEWAY = 5; // the service's ECARD_CLOCK_SKEW
export const DEFAULT_LIFETIME = 60; // the service's ECARD_CREDENTIAL_LIFETIME
const PURPOSES = { 1: "transit", 2: "medical", 3: "park", 4: "library", 5: "general" };
const MAX_LIST_BYTES = 64 * 1024 * 1024;

/** Why a scan or a kit is refused, with a stable code (crypto/offline.py's reasons). */
export class Refused extends Error {
  constructor(reason, detail) {
    super(detail);
    this.reason = reason;
  }
}

const malformed = (detail) => new Refused("malformed", detail);

// --- encodings ----------------------------------------------------------------------------------

const B45 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:";

/** Base45 (RFC 9285) text to bytes; Refused(malformed) on anything else. */
export function base45Decode(text) {
  const values = [...text].map((c) => B45.indexOf(c));
  if (values.includes(-1) || values.length % 3 === 1) throw malformed("not Base45 text");
  const out = [];
  for (let i = 0; i < values.length; i += 3) {
    if (i + 2 < values.length) {
      const n = values[i] + values[i + 1] * 45 + values[i + 2] * 2025;
      if (n > 0xffff) throw malformed("not Base45 text");
      out.push(n >> 8, n & 0xff);
    } else {
      const n = values[i] + values[i + 1] * 45;
      if (n > 0xff) throw malformed("not Base45 text");
      out.push(n);
    }
  }
  return Uint8Array.from(out);
}

function base64urlDecode(text) {
  if (typeof text !== "string" || !/^[A-Za-z0-9_-]*$/.test(text) || text.length % 4 === 1) throw new Error("not base64url");
  const binary = atob(text.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (text.length % 4)) % 4));
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

const base64url = (bytes) => btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
const equal = (a, b) => a.length === b.length && a.every((value, i) => value === b[i]);
const concat = (...parts) => {
  const out = new Uint8Array(parts.reduce((n, part) => n + part.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
};

/** A tagged value of the CBOR decoder. */
class Tag {
  constructor(tag, value) {
    this.tag = tag;
    this.value = value;
  }
}

/**
 * One CBOR item (RFC 8949) of the kinds these tokens use — integers, byte and text strings, arrays, maps
 * (a Map, integer or text keys, no duplicates), tags, false/true/null — and nothing after it. Anything
 * else (floats, indefinite lengths, integers beyond 2^53) is refused as malformed.
 */
export function cborDecode(bytes) {
  let at = 0;
  const need = (n) => {
    if (at + n > bytes.length) throw malformed("CBOR item is cut short");
  };
  const argument = (info) => {
    if (info < 24) return info;
    const size = { 24: 1, 25: 2, 26: 4, 27: 8 }[info];
    if (!size) throw malformed("CBOR indefinite lengths and reserved values are not used here");
    need(size);
    let value = 0;
    for (let i = 0; i < size; i += 1) value = value * 256 + bytes[at + i];
    at += size;
    if (!Number.isSafeInteger(value)) throw malformed("CBOR integer out of range");
    return value;
  };
  const item = (depth) => {
    if (depth > 16) throw malformed("CBOR nested too deep");
    need(1);
    const initial = bytes[at];
    at += 1;
    const major = initial >> 5;
    const info = initial & 0x1f;
    if (major === 7) {
      const simple = { 20: false, 21: true, 22: null }[info];
      if (simple === undefined) throw malformed("CBOR floats and simple values are not used here");
      return simple;
    }
    const n = argument(info);
    if (major === 0) return n;
    if (major === 1) return -1 - n;
    if (major === 2 || major === 3) {
      need(n);
      const part = bytes.subarray(at, at + n);
      at += n;
      if (major === 2) return part;
      try {
        return new TextDecoder("utf-8", { fatal: true }).decode(part);
      } catch {
        throw malformed("CBOR text is not UTF-8");
      }
    }
    if (major === 4) return Array.from({ length: n }, () => item(depth + 1));
    if (major === 5) {
      const map = new Map();
      for (let i = 0; i < n; i += 1) {
        const key = item(depth + 1);
        if (typeof key !== "number" && typeof key !== "string") throw malformed("CBOR map keys are integers or text here");
        if (map.has(key)) throw malformed("CBOR map has a duplicate key");
        map.set(key, item(depth + 1));
      }
      return map;
    }
    return new Tag(n, item(depth + 1));
  };
  const value = item(0);
  if (at !== bytes.length) throw malformed("trailing bytes after the CBOR item");
  return value;
}

function bstrHead(length) {
  if (length < 24) return Uint8Array.of(0x40 | length);
  if (length < 0x100) return Uint8Array.of(0x58, length);
  return Uint8Array.of(0x59, length >> 8, length & 0xff);
}

const ALG_BYTES = { [ALG_EDDSA]: Uint8Array.of(0x27), [ALG_SM2_SM3]: Uint8Array.of(0x3a, 0x00, 0x01, 0x00, 0x01) };
const TYP_BYTES = concat(Uint8Array.of(0x10, 0x78, STATUS_LIST_TYP.length), new TextEncoder().encode(STATUS_LIST_TYP));

/** The only protected header this profile accepts: {1: alg, 4: kid} (and {16: typ}), canonical CBOR. */
function protectedHeader(alg, kid, typed) {
  const head = Uint8Array.of(typed ? 0xa3 : 0xa2, 0x01);
  return concat(head, ALG_BYTES[alg], Uint8Array.of(0x04, 0x48), kid, typed ? TYP_BYTES : new Uint8Array());
}

/** RFC 9052 Sig_structure of a COSE_Sign1 with empty external_aad. */
function sigStructure(protectedBytes, payload) {
  const head = concat(Uint8Array.of(0x84, 0x6a), new TextEncoder().encode("Signature1"));
  return concat(head, bstrHead(protectedBytes.length), protectedBytes, Uint8Array.of(0x40), bstrHead(payload.length), payload);
}

/** {protected, payload, signature, kid, alg} of a tagged COSE_Sign1 of this profile (crypto/cose.py's rules). */
function decodeSign1(bytes, typed) {
  const message = cborDecode(bytes);
  if (!(message instanceof Tag) || message.tag !== 18) throw malformed("not a tagged COSE_Sign1 (CBOR tag 18)");
  const parts = message.value;
  if (!Array.isArray(parts) || parts.length !== 4) throw malformed("COSE_Sign1 must be an array of four items");
  const [protectedBytes, unprotected, payload, signature] = parts;
  if (!(protectedBytes instanceof Uint8Array && unprotected instanceof Map && payload instanceof Uint8Array && signature instanceof Uint8Array)) {
    throw malformed("COSE_Sign1 items have the wrong types");
  }
  const header = cborDecode(protectedBytes);
  const alg = header instanceof Map ? header.get(1) : undefined;
  if (alg !== ALG_EDDSA && alg !== ALG_SM2_SM3) throw malformed("protected header must name alg EdDSA (-8) or SM2 with SM3 (-65538)");
  const kid = header.get(4);
  if (!(kid instanceof Uint8Array) || kid.length !== 8) throw malformed("protected header must carry an 8-byte kid");
  if (!equal(protectedBytes, protectedHeader(alg, kid, typed))) throw malformed("protected header is not exactly this profile's");
  if (unprotected.size) throw malformed("unprotected header must be empty");
  return { protectedBytes, payload, signature, kid, alg };
}

// --- keys ----------------------------------------------------------------------------------------

let noble = null;
let smCrypto = null;

async function loadNoble() {
  noble ||= await import(NOBLE_URL);
  return noble;
}

/** The vendored sm-crypto-v2 (a UMD bundle: it sets globalThis.SmCryptoV2), loaded on first use. */
function loadSmCrypto() {
  if (globalThis.SmCryptoV2) return Promise.resolve(globalThis.SmCryptoV2);
  smCrypto ||= new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = SM_URL;
    script.onload = () => (globalThis.SmCryptoV2 ? resolve(globalThis.SmCryptoV2) : reject(new Error("sm-crypto-v2 did not load")));
    script.onerror = () => {
      smCrypto = null;
      reject(new Error("sm-crypto-v2 could not be loaded"));
    };
    document.head.append(script);
  });
  return smCrypto;
}

/** An issuer key of a kit: {alg, kid (8 bytes), region, verify(signature, message) → Promise<boolean>}. */
async function readKey(entry) {
  const ed25519 = entry.kty === "OKP" && entry.crv === "Ed25519";
  const sm2 = entry.kty === "EC" && entry.crv === "SM2";
  if (!ed25519 && !sm2) return null; // a kind this console does not know: skipped, as RFC 7517 asks
  const region = entry.region;
  if (typeof region !== "string" || !/^[0-9]{6}$/.test(region)) throw new Error("a key's region must be a 6-digit code");
  if (ed25519) {
    const publicKey = base64urlDecode(entry.x);
    if (publicKey.length !== 32) throw new Error("an Ed25519 key has 32 bytes");
    const canonical = JSON.stringify({ crv: "Ed25519", kty: "OKP", x: entry.x });
    const kid = new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(canonical))).subarray(0, 8);
    const ed = await loadNoble();
    const verify = async (signature, message) => {
      if (signature.length !== 64) return false;
      try {
        return await ed.verifyAsync(signature, message, publicKey);
      } catch {
        return false;
      }
    };
    return { alg: ALG_EDDSA, kid, region, verify };
  }
  const x = base64urlDecode(entry.x);
  const y = base64urlDecode(entry.y);
  if (x.length !== 32 || y.length !== 32) throw new Error("SM2 JWK coordinates have 32 bytes each");
  const sm = await loadSmCrypto();
  const publicHex = `04${hex(x)}${hex(y)}`;
  if (!sm.sm2.verifyPublicKey(publicHex)) throw new Error("the SM2 JWK's point is not on the curve");
  const canonical = JSON.stringify({ crv: "SM2", kty: "EC", x: entry.x, y: entry.y });
  const kid = Uint8Array.from(sm.sm3(canonical).match(/../g), (byte) => parseInt(byte, 16)).subarray(0, 8);
  const verify = async (signature, message) => {
    if (signature.length !== 64) return false;
    try {
      return sm.sm2.doVerifySignature(message, hex(signature), publicHex, { der: false, hash: true, userId: SM2_SIGNER_ID });
    } catch {
      return false;
    }
  };
  return { alg: ALG_SM2_SM3, kid, region, verify };
}

/** Signature check, the kid's key deciding the algorithm; Refused(bad_signature) otherwise. */
async function checkSignature(message, key) {
  if (key.alg !== message.alg) throw new Refused("bad_signature", "the header's algorithm is not the kid's key's");
  if (!(await key.verify(message.signature, sigStructure(message.protectedBytes, message.payload)))) {
    throw new Refused("bad_signature", "signature does not verify");
  }
}

const isTime = (value) => Number.isSafeInteger(value) && value >= 0 && value < 2 ** 32;

/**
 * A kit ready to decide scans: {region, keys: Map(kid b64url → key), list: {expiresAt, bits, bytes}}.
 * Throws Error (with the reason in its message) when the kit cannot be used.
 */
export async function loadKit(document) {
  if (!document || typeof document !== "object") throw new Error("a kit is a JSON object");
  const region = document.region;
  if (typeof region !== "string" || !/^[0-9]{6}$/.test(region)) throw new Error("kit region must be a 6-digit code");
  const entries = document.jwks?.keys;
  if (!Array.isArray(entries)) throw new Error("kit jwks: a JWKS is an object with a 'keys' array");
  const keys = new Map();
  for (const entry of entries) {
    if (!entry || typeof entry !== "object") continue;
    const key = await readKey(entry);
    if (!key) continue;
    if (entry.kid !== base64url(key.kid)) throw new Error(`kit jwks: JWK kid ${entry.kid} does not match its key's thumbprint`);
    keys.set(entry.kid, key);
  }
  let token;
  try {
    token = base64urlDecode(document.status_list);
  } catch {
    throw new Error("kit status_list must be base64url text");
  }
  let message;
  try {
    message = decodeSign1(token, true);
    const key = keys.get(base64url(message.kid));
    if (!key) throw new Refused("unknown_key", "no key of the kit has the status list's kid");
    await checkSignature(message, key);
    const claims = cborDecode(message.payload);
    if (!(claims instanceof Map) || claims.get(1) !== key.region) throw new Refused("bad_signature", "key does not sign for the list's region");
    if (claims.get(1) !== region) throw new Error(`kit status list covers region ${claims.get(1)}, not ${region}`);
    const expiresAt = claims.get(4);
    const list = claims.get(65533);
    if (!isTime(expiresAt) || !(list instanceof Map)) throw malformed("status list needs exp and its list");
    const bits = list.get("bits");
    const compressed = list.get("lst");
    if (![1, 2, 4, 8].includes(bits) || !(compressed instanceof Uint8Array)) throw malformed("status list bits or lst");
    const bytes = await inflate(compressed);
    return { region, keys, list: { expiresAt, bits, bytes } };
  } catch (error) {
    if (error instanceof Refused) throw new Error(`kit status list (${error.reason}): ${error.message}`);
    throw error;
  }
}

/** zlib-inflate at most MAX_LIST_BYTES (a zlib bomb is refused). */
async function inflate(compressed) {
  const stream = new Blob([compressed]).stream().pipeThrough(new DecompressionStream("deflate"));
  const chunks = [];
  let total = 0;
  try {
    for await (const chunk of stream) {
      total += chunk.length;
      if (total > MAX_LIST_BYTES) throw malformed("status list is too large");
      chunks.push(chunk);
    }
  } catch (error) {
    if (error instanceof Refused) throw error;
    throw malformed("status list is not zlib data");
  }
  return concat(...chunks);
}

/** The claims of a credential payload (crypto/credential.py's decode_claims). */
function decodeClaims(payload) {
  const claims = cborDecode(payload);
  if (!(claims instanceof Map) || [...claims.keys()].some((key) => typeof key !== "number")) throw malformed("payload is not a claims map with integer keys");
  const region = claims.get(1);
  const exp = claims.get(4);
  const nbf = claims.get(5);
  const nonce = claims.get(7);
  const card = claims.get(-65537);
  if (typeof region !== "string" || !/^[0-9]{6}$/.test(region)) throw malformed("iss must be a 6-digit region code");
  if (!isTime(exp) || !isTime(nbf) || nbf > exp) throw malformed("nbf and exp must be integers with nbf <= exp");
  if (!(nonce instanceof Uint8Array) || nonce.length !== 7) throw malformed("cti must be a 7-byte nonce");
  if (!Array.isArray(card) || card.length !== 2) throw malformed("card claim must be [sealed_ref, purpose]");
  const [sealedRef, purpose] = card;
  if (!(sealedRef instanceof Uint8Array) || sealedRef.length !== 16) throw malformed("sealed card reference must be 16 bytes");
  if (!Number.isInteger(purpose) || !PURPOSES[purpose]) throw malformed("unknown purpose");
  return { region, expiresAt: exp, notBefore: nbf, nonce: hex(nonce), sealedRef: hex(sealedRef), purpose: PURPOSES[purpose] };
}

/**
 * Decide one scan with the kits alone: {result: "accepted" | "rejected", reason, detail, claims, alg}.
 * `kits` is a Map region → loadKit's kit; `seen` a Map "sealed_ref:nonce" → last second it can be
 * accepted, the console's own single-use memory.
 */
export async function verifyOffline(text, kits, seen, { now = Math.floor(Date.now() / 1000), leeway = DEFAULT_LEEWAY, lifetime = DEFAULT_LIFETIME } = {}) {
  try {
    if (typeof text !== "string" || text.length > MAX_TEXT_LENGTH) throw malformed("credential text is missing or too long");
    if (!text.startsWith(PREFIX)) throw malformed(`credential text must start with ${PREFIX}`);
    const message = decodeSign1(base45Decode(text.slice(PREFIX.length)), false);
    const kid = base64url(message.kid);
    const key = [...kits.values()].map((kit) => kit.keys.get(kid)).find(Boolean);
    if (!key) throw new Refused("unknown_key", "no key of the loaded kits has this kid");
    await checkSignature(message, key);
    const claims = decodeClaims(message.payload);
    if (claims.region !== key.region) throw new Refused("bad_signature", "key does not sign for the credential's region");
    if (claims.expiresAt - claims.notBefore > lifetime + leeway) throw new Refused("lifetime_exceeded", "valid for longer than codes are issued");
    if (now > claims.expiresAt + leeway) throw new Refused("expired", "credential has expired");
    if (now + leeway < claims.notBefore) throw new Refused("not_yet_valid", "credential is not valid yet");
    const algorithm = key.alg === ALG_SM2_SM3 ? "SM2" : "Ed25519";
    const decided = (reason, detail) => ({ result: reason ? "rejected" : "accepted", reason, detail, claims, alg: algorithm });
    const kit = kits.get(claims.region);
    if (!kit) return decided("region_not_accepted", `no offline kit for region ${claims.region}`);
    if (now > kit.list.expiresAt + leeway) return decided("status_stale", "the offline kit has expired");
    const pair = `${claims.sealedRef}:${claims.nonce}`;
    for (const [other, until] of seen) if (until < now) seen.delete(other);
    if (seen.has(pair)) return decided("replayed", "this console accepted the code before");
    seen.set(pair, Math.min(claims.expiresAt, claims.notBefore + lifetime + leeway) + leeway);
    return decided(null, "accepted offline");
  } catch (error) {
    if (error instanceof Refused) return { result: "rejected", reason: error.reason, detail: error.message, claims: null, alg: null };
    throw error;
  }
}
