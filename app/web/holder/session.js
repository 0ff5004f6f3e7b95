// The holder's session on this device: the access token (15 minutes) and the single-use refresh token,
// kept in localStorage, and the holder API called with them. Both are bound to the device key (DPoP,
// RFC 9449): every call carries `Authorization: DPoP <token>` and a new proof signed by that key, so a
// copied token is no use on another device.
//
// Refresh tokens rotate and a reused one revokes the whole sign-in, so two tabs must never refresh with
// the same token: the refresh runs under a Web Lock (where the browser has them) and first checks whether
// another tab already stored a newer pair.

import { ApiError, call, serverNow } from "/web/api.js";
import { dpopProof, loadDeviceKey } from "/app/device-key.js";

const KEY = "ecard.holder.session";
const EARLY_REFRESH_MS = 60_000;

/** The device key the tokens are bound to; without it, the session is no use. */
async function deviceKey() {
  const key = await loadDeviceKey().catch(() => undefined);
  if (!key) throw new SignedOut("this device has no device key; activate it again");
  return key;
}

/** Whether a refusal was of a proof the service found too old or too new: this device's clock is off. */
function staleProof(error) {
  return error instanceof ApiError && error.code === "invalid_dpop_proof" && error.problem.reason === "stale";
}

/** `request()` once more if its proof was stale: the refusal's `Date` has set the clock it is made by. */
async function againIfStale(request) {
  try {
    return await request();
  } catch (error) {
    if (!staleProof(error)) throw error;
    return request();
  }
}

/** The session is gone (never made, signed out, device removed, refresh refused). */
export class SignedOut extends Error {
  constructor(detail) {
    super(detail || "signed out");
    this.name = "SignedOut";
  }
}

export function loadSession() {
  try {
    const session = JSON.parse(localStorage.getItem(KEY) || "null");
    return session && session.access_token && session.refresh_token ? session : null;
  } catch {
    return null;
  }
}

/** Store the tokens of an activation or refresh answer. */
export function saveSession(answer, keyKind) {
  const previous = loadSession();
  const session = {
    access_token: answer.access_token,
    refresh_token: answer.refresh_token,
    access_expires_at: Date.now() + answer.expires_in * 1000,
    ecard_id: answer.ecard_id,
    device_id: answer.device_id,
    key_kind: keyKind || previous?.key_kind || "webcrypto",
  };
  localStorage.setItem(KEY, JSON.stringify(session));
  return session;
}

export function clearSession() {
  localStorage.removeItem(KEY);
}

let refreshing = null;

async function refreshUnderLock(stale) {
  const current = loadSession();
  if (!current) throw new SignedOut();
  if (current.refresh_token !== stale.refresh_token) return current; // another tab refreshed first
  try {
    const path = "/v1/holder/token";
    const key = await deviceKey();
    const answer = await againIfStale(async () => {
      const proof = await dpopProof(key, "POST", path, undefined, serverNow());
      return call(path, { method: "POST", body: { refresh_token: current.refresh_token }, headers: { dpop: proof } });
    });
    return saveSession(answer);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      clearSession();
      throw new SignedOut(error.message);
    }
    throw error; // offline or the service is down: keep the tokens and try again later
  }
}

/** A fresh access token, refreshing (once, across tabs) when `stale` is the session in hand. */
function refresh(stale) {
  if (!refreshing) {
    const run = () => refreshUnderLock(stale);
    const locked = navigator.locks ? navigator.locks.request("ecard-holder-refresh", run) : run();
    refreshing = locked.finally(() => {
      refreshing = null;
    });
  }
  return refreshing;
}

/** Call the holder API with the session's access token; refresh it when it is old or refused. */
export async function holderCall(path, options = {}) {
  let session = loadSession();
  if (!session) throw new SignedOut();
  if (session.access_expires_at - EARLY_REFRESH_MS < Date.now()) session = await refresh(session);
  const key = await deviceKey();
  const send = (token) =>
    againIfStale(async () => {
      const proof = await dpopProof(key, options.method || "GET", path, token, serverNow());
      const headers = { ...(options.headers || {}), authorization: `DPoP ${token}`, dpop: proof };
      return call(path, { ...options, headers });
    });
  try {
    return await send(session.access_token);
  } catch (error) {
    if (!(error instanceof ApiError) || error.status !== 401) throw error;
    // A removed device's refresh tokens are dead too, so this ends in SignedOut.
    session = await refresh(session);
    try {
      return await send(session.access_token);
    } catch (again) {
      if (again instanceof ApiError && again.status === 401) {
        clearSession();
        throw new SignedOut(again.message);
      }
      throw again;
    }
  }
}
