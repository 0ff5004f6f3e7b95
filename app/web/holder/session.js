// The holder's session on this device: the access token (15 minutes) and the single-use refresh token,
// kept in localStorage, and the holder API called with them.
//
// Refresh tokens rotate and a reused one revokes the whole sign-in, so two tabs must never refresh with
// the same token: the refresh runs under a Web Lock (where the browser has them) and first checks whether
// another tab already stored a newer pair.

import { ApiError, call } from "/web/api.js";

const KEY = "ecard.holder.session";
const EARLY_REFRESH_MS = 60_000;

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
    const answer = await call("/v1/holder/token", { method: "POST", body: { refresh_token: current.refresh_token } });
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
  const send = (token) => call(path, { ...options, headers: { ...(options.headers || {}), authorization: `Bearer ${token}` } });
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
