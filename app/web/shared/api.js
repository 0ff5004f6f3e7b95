// Calls to the eCard API from the pages: JSON in, JSON (or an image) out, RFC 9457 problems as ApiError.

/** An answer that was not 2xx: the problem's status, stable `code` and `detail`. */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || problem?.title || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.code = problem?.code || (status === 0 ? "network" : "error");
    this.problem = problem || {};
  }
}

/** The network itself failed (offline, server down): nothing is known about the request's fate. */
export class NetworkError extends ApiError {
  constructor(cause) {
    super(0, { detail: "the service cannot be reached", code: "network" });
    this.name = "NetworkError";
    this.cause = cause;
  }
}

// The service's clock minus this device's, in ms, from the `Date` of its last answer (a phone's clock
// may be minutes off; the times the service checks, such as a DPoP proof's, must be its own).
let clockOffsetMs = 0;

/** The service's time now, as far as this page can tell (ms since the epoch). */
export function serverNow() {
  return Date.now() + clockOffsetMs;
}

/**
 * Send a request to the service's own origin. `body` is sent as JSON; `headers` are added as given.
 * Returns the parsed JSON (or a Blob when `as: "blob"`, or null for 204); throws ApiError otherwise.
 */
export async function call(path, { method = "GET", body, headers = {}, as = "json", signal } = {}) {
  const init = { method, headers: { ...headers }, signal, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error?.name === "AbortError") throw error;
    throw new NetworkError(error);
  }
  const date = Date.parse(response.headers.get("date") || "");
  if (!Number.isNaN(date)) clockOffsetMs = date + 500 - Date.now(); // `Date` has whole seconds
  if (!response.ok) {
    let problem = null;
    try {
      problem = await response.json();
    } catch {
      problem = null;
    }
    const error = new ApiError(response.status, problem);
    error.retryAfter = Number(response.headers.get("retry-after")) || null;
    throw error;
  }
  if (response.status === 204) return null;
  if (as === "blob") return response.blob();
  return response.json();
}

/** Fill an element with text (never HTML: everything shown comes from the network). */
export function say(element, text, kind = "info") {
  if (!element) return;
  element.textContent = text || "";
  element.className = `notice ${kind}`;
  element.hidden = !text;
}

/** A local date and time, short. A time without an offset is UTC (as the API means it). */
export function when(iso) {
  const text = String(iso || "");
  const date = new Date(/T.*([zZ]|[+-]\d\d:?\d\d)$/.test(text) || !text.includes("T") ? text : `${text}Z`);
  return Number.isNaN(date.getTime())
    ? ""
    : date.toLocaleString("zh-CN", { hour12: false, month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

/** Build an element: el("li", {class: "x"}, "text", child…). Attributes set as attributes, children as text or nodes. */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export const PURPOSES = {
  transit: ["交通出行", "Transit"],
  medical: ["医保结算", "Medical"],
  park: ["公园景区", "Parks"],
  library: ["图书借阅", "Library"],
  general: ["通用", "General"],
};

/** The reasons `/v1/verify` gives for a rejection, in both languages. */
export const REASONS = {
  malformed: ["无法识别的二维码", "Not an eCard code"],
  unknown_key: ["签发密钥未知", "Unknown issuer key"],
  bad_signature: ["签名无效", "Bad signature"],
  expired: ["二维码已过期", "Code expired"],
  not_yet_valid: ["二维码尚未生效", "Code not yet valid"],
  replayed: ["二维码已被使用", "Already used (replayed)"],
  card_suspended: ["卡已挂失或暂停", "Card suspended"],
  card_revoked: ["卡已注销", "Card revoked"],
  card_unknown: ["卡状态未知", "Card status unknown"],
  purpose_not_allowed: ["用途不符", "Purpose not allowed here"],
  region_not_accepted: ["不受理该地区的卡", "Card region not accepted"],
  scan_time_invalid: ["扫描时间无效", "Scan time invalid"],
};

/** What a verifier may learn, labelled in both languages. */
export const CLAIM_LABELS = {
  card_pseudonym: "乘客标识 Rider pseudonym",
  member_id: "读者号 Member id",
  annual_pass_until: "年卡有效期 Annual pass until",
  holder_name: "姓名 Name",
  citizen_id_masked: "身份证号 Citizen ID",
  insurance_region: "参保地 Insurance region",
  card_region: "发卡地 Card region",
};
