// The live QR code: credentials fetched as a bundle of consecutive windows, each shown from its
// `not_before` to its `refresh_at`, with a countdown; a new bundle is fetched a minute before the last
// window ends, so the screen always shows a valid code. The images (rendered by the service) of the
// whole bundle are fetched one after another as soon as it arrives: that costs the service the same
// renders as fetching each when due, and a phone that loses its network keeps valid codes until the
// bundle runs out. Medical codes come one at a time and need a PIN step-up token (valid 5 minutes).
//
// Times are the server's: the offset between the device clock and the bundle's `server_time` is applied,
// so a phone whose clock is wrong still switches codes when the server expects it to.

import { ApiError, NetworkError } from "/web/api.js";
import { SignedOut, holderCall } from "/app/session.js";

const BUNDLE_SIZE = 20; // 20 × 30 s: one request per ten minutes
const BUNDLE_LEAD_MS = 60_000; // fetch the next bundle while a minute of codes is left
const SINGLE_LEAD_MS = 3_000; // a one-at-a-time code is replaced just before its refresh time
const EXPIRY_MARGIN_MS = 5_000; // never show a code this close to its expiry
const STEP_UP_MARGIN_MS = 5_000;
const TICK_MS = 250;

function seconds(ms) {
  return Math.max(0, Math.ceil(ms / 1000));
}

export class LiveCode {
  /**
   * @param parts the page's elements: frame (data-state), image, fill, countdown, message
   * @param events onSuspended(), onNeedPin(), onSignedOut(error), onMessage(text, kind)
   */
  constructor(parts, events) {
    this.parts = parts;
    this.events = events;
    this.purpose = null;
    this.items = [];
    this.offsetMs = 0;
    this.shown = null;
    this.wanted = null;
    this.images = new Map();
    this.loading = new Map();
    this.imageRetryAt = 0;
    this.fetching = false;
    this.retryAt = 0;
    this.backoffMs = 0;
    this.bundleSize = BUNDLE_SIZE;
    this.stepUp = null;
    this.askedForPin = false;
    this.timer = null;
    this.wakeLock = null;
    this.onVisible = () => {
      if (document.visibilityState === "visible" && this.timer) {
        this.keepAwake();
        this.tick();
      }
    };
  }

  now() {
    return Date.now() + this.offsetMs;
  }

  /** Show live codes for a purpose: the ones in hand if they are for it, else new ones. */
  start(purpose) {
    if (purpose !== this.purpose) this.stop();
    else this.pause();
    this.purpose = purpose;
    this.askedForPin = false;
    if (!this.shown) this.setState("loading");
    this.timer = setInterval(() => this.tick(), TICK_MS);
    document.addEventListener("visibilitychange", this.onVisible);
    this.keepAwake();
    this.tick();
  }

  /** Stop the clock (another view of the page), keeping the codes in hand. */
  pause() {
    clearInterval(this.timer);
    this.timer = null;
    document.removeEventListener("visibilitychange", this.onVisible);
    this.wakeLock?.release().catch(() => {});
    this.wakeLock = null;
  }

  /** Stop and forget every code (card suspended, signed out, another purpose). */
  stop() {
    this.pause();
    this.purpose = null;
    this.items = [];
    this.shown = null;
    this.wanted = null;
    for (const url of this.images.values()) URL.revokeObjectURL(url);
    this.images.clear();
    this.parts.image.removeAttribute("src");
    this.setState("empty");
    this.parts.countdown.textContent = "";
  }

  /** Drop the codes in hand and fetch new ones now (the holder's refresh button). */
  refreshNow() {
    if (!this.purpose) return;
    this.items = [];
    this.retryAt = 0;
    this.backoffMs = 0;
    this.askedForPin = false;
    this.setState("loading");
    this.tick();
  }

  /** A PIN step-up token for medical codes. */
  setStepUp(token, expiresInSeconds) {
    this.stepUp = { token, expiresAt: Date.now() + expiresInSeconds * 1000 };
    this.askedForPin = false;
    this.retryAt = 0;
    this.tick();
  }

  hasStepUp() {
    return Boolean(this.stepUp && this.stepUp.expiresAt - STEP_UP_MARGIN_MS > Date.now());
  }

  setState(state) {
    this.parts.frame.dataset.state = state;
  }

  async keepAwake() {
    try {
      if (navigator.wakeLock && !this.wakeLock) this.wakeLock = await navigator.wakeLock.request("screen");
      this.wakeLock?.addEventListener("release", () => {
        this.wakeLock = null;
      });
    } catch {
      this.wakeLock = null; // not allowed here (battery saver, hidden page): the code still works
    }
  }

  current(now) {
    const due = this.items.find((item) => item.notBefore <= now && now < item.refreshAt);
    if (due) return due;
    // Past the last refresh time (offline): the last code stays good until shortly before it expires.
    return this.items.filter((item) => item.notBefore <= now && now < item.expiresAt - EXPIRY_MARGIN_MS).at(-1);
  }

  tick() {
    if (!this.timer) return;
    const now = this.now();
    const item = this.current(now);
    if (item) {
      this.display(item);
      const inWindow = now < item.refreshAt;
      const end = inWindow ? item.refreshAt : item.expiresAt - EXPIRY_MARGIN_MS;
      const left = end - now;
      const span = Math.max(1, end - item.notBefore);
      this.parts.fill.style.width = `${Math.max(0, Math.min(100, (100 * left) / span))}%`;
      this.parts.countdown.textContent = inWindow
        ? `${seconds(left)} 秒后自动刷新 · refreshes in ${seconds(left)} s`
        : `${seconds(left)} 秒后失效 · expires in ${seconds(left)} s`;
    } else if (this.shown) {
      this.shown = null;
      this.parts.image.removeAttribute("src");
      this.setState("loading");
      this.parts.countdown.textContent = "";
    }
    const coveredUntil = this.items.reduce((latest, candidate) => Math.max(latest, candidate.refreshAt), 0);
    const lead = this.purpose === "medical" ? SINGLE_LEAD_MS : BUNDLE_LEAD_MS;
    if (!this.fetching && Date.now() >= this.retryAt && coveredUntil - now < lead) this.fetch();
  }

  async fetch() {
    const purpose = this.purpose;
    const body = { purpose, count: purpose === "medical" ? 1 : this.bundleSize };
    if (purpose === "medical") {
      if (!this.hasStepUp()) {
        this.stepUp = null;
        if (!this.askedForPin) {
          this.askedForPin = true;
          this.events.onNeedPin();
        }
        return;
      }
      body.step_up_token = this.stepUp.token;
    }
    this.fetching = true;
    try {
      const sent = Date.now();
      const bundle = await holderCall("/v1/holder/credentials", { method: "POST", body });
      const received = Date.now();
      if (this.purpose !== purpose) return;
      const serverTime = Date.parse(bundle.server_time);
      if (!Number.isNaN(serverTime)) this.offsetMs = serverTime - (sent + received) / 2;
      this.items = bundle.credentials.map((item) => ({
        credential: item.credential,
        notBefore: Date.parse(item.not_before),
        refreshAt: Date.parse(item.refresh_at),
        expiresAt: Date.parse(item.expires_at),
      }));
      this.forgetImagesNotIn(this.items);
      this.backoffMs = 0;
      this.events.onMessage("");
      this.prefetch(this.items);
    } catch (error) {
      this.failed(error, body.count);
    } finally {
      this.fetching = false;
    }
    this.tick();
  }

  failed(error, count) {
    if (error instanceof SignedOut) {
      this.stop();
      this.events.onSignedOut(error);
    } else if (error instanceof ApiError && error.status === 409) {
      this.stop();
      this.events.onSuspended();
    } else if (error instanceof ApiError && error.code === "step_up_required") {
      this.stepUp = null;
      this.askedForPin = true;
      this.events.onNeedPin();
    } else if (error instanceof ApiError && error.status === 400 && count > 1) {
      this.bundleSize = Math.max(1, Math.floor(count / 2)); // a deployment with a smaller bundle limit
    } else {
      this.backoffMs = Math.min(30_000, this.backoffMs ? this.backoffMs * 2 : 2_000);
      this.retryAt = Date.now() + this.backoffMs;
      const offline = error instanceof NetworkError || (error instanceof ApiError && error.status === 503);
      this.events.onMessage(
        offline
          ? "网络不可用，正在显示已缓存的二维码 · Offline: showing the codes already on this phone"
          : `无法获取二维码 · Could not get a code: ${error.message}`,
        offline ? "warn" : "error",
      );
    }
  }

  /** Fetch the images of a bundle one after another, while it is still the one in hand. */
  async prefetch(items) {
    for (const item of items) {
      if (this.items !== items) return;
      if (item.expiresAt - EXPIRY_MARGIN_MS < this.now()) continue;
      try {
        await this.image(item.credential);
      } catch {
        return; // offline or signed out: the clock fetches what it shows, and reports the error
      }
    }
  }

  /** An object URL of the code's image, fetched once (concurrent askers share the request). */
  image(text) {
    if (this.images.has(text)) return Promise.resolve(this.images.get(text));
    if (!this.loading.has(text)) {
      const request = holderCall("/v1/holder/credentials/qr", { method: "POST", body: { credential: text, format: "svg" }, as: "blob" })
        .then((blob) => {
          const url = URL.createObjectURL(blob);
          this.images.set(text, url);
          return url;
        })
        .finally(() => this.loading.delete(text));
      this.loading.set(text, request);
    }
    return this.loading.get(text);
  }

  forgetImagesNotIn(items) {
    const keep = new Set(items.map((item) => item.credential));
    if (this.shown) keep.add(this.shown);
    for (const [text, url] of this.images) {
      if (!keep.has(text)) {
        URL.revokeObjectURL(url);
        this.images.delete(text);
      }
    }
  }

  display(item) {
    if (this.shown === item.credential || this.wanted === item.credential) return;
    if (Date.now() < this.imageRetryAt) return;
    this.wanted = item.credential;
    this.image(item.credential).then(
      (url) => {
        if (this.wanted !== item.credential) return;
        if (!this.timer) {
          this.wanted = null; // paused meanwhile: shown when the clock runs again
          return;
        }
        const previous = this.shown;
        this.parts.image.onload = () => {
          if (this.shown === item.credential) this.setState("live");
        };
        this.parts.image.src = url;
        this.shown = item.credential;
        this.wanted = null;
        if (previous && previous !== item.credential && !this.items.some((other) => other.credential === previous)) {
          URL.revokeObjectURL(this.images.get(previous));
          this.images.delete(previous);
        }
      },
      (error) => {
        if (this.wanted === item.credential) this.wanted = null;
        this.imageRetryAt = Date.now() + 2_000;
        this.failed(error, 1);
      },
    );
  }
}
