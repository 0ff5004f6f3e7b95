// The gate console: a terminal signs in with its API key (kept in this tab's sessionStorage only),
// verifies scanned codes with POST /v1/verify, and shows a large answer with the reason and the
// claims its business type may see, plus running counts.

import { ApiError, CLAIM_LABELS, NetworkError, PURPOSES, REASONS, call, el, say, when } from "/web/api.js";
import { loadKit, verifyOffline } from "/gate/offline.js";
import { readQrFromFile, readerName, watchCamera } from "/gate/scanner.js";

const $ = (id) => document.getElementById(id);
const KEY = "ecard.gate.api-key";
const COUNTS = "ecard.gate.counts";
const KEY_FORMAT = /^ecv1\.[^.\s]+\.[^.\s]+$/;
const HISTORY_LENGTH = 20;

let apiKey = sessionStorage.getItem(KEY);
let counts = JSON.parse(sessionStorage.getItem(COUNTS) || '{"accepted":0,"rejected":0,"repeats":0}');
let stopCamera = null;
let queue = Promise.resolve();
// Offline verification (gate/offline.js): the loaded kits by region, and the codes accepted offline here.
const kits = new Map();
const seenOffline = new Map();

function showView() {
  const signedIn = Boolean(apiKey);
  $("view-signin").hidden = signedIn;
  $("view-console").hidden = !signedIn;
  $("terminal-bar").hidden = !signedIn;
  if (signedIn) {
    $("terminal-id").textContent = `终端 Terminal ${apiKey.split(".")[1].slice(0, 8)}`;
    renderCounts();
    $("scan-text").focus();
  } else {
    $("api-key").focus();
  }
}

function signIn(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!KEY_FORMAT.test(key)) return say($("signin-message"), "密钥格式不正确 · That is not a terminal API key (ecv1.…)", "error");
  apiKey = key;
  sessionStorage.setItem(KEY, key);
  $("api-key").value = "";
  say($("signin-message"), "");
  showView();
}

function signOut(reason) {
  stopCamera?.();
  stopCamera = null;
  apiKey = null;
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(COUNTS);
  counts = { accepted: 0, rejected: 0, repeats: 0 };
  $("history").replaceChildren();
  setResult("idle", ["请扫码", "Ready to scan"], "");
  say($("signin-message"), reason || "", "error");
  showView();
}

function renderCounts() {
  $("count-accepted").textContent = counts.accepted;
  $("count-rejected").textContent = counts.rejected;
  $("count-repeats").textContent = counts.repeats;
  sessionStorage.setItem(COUNTS, JSON.stringify(counts));
}

function setResult(outcome, [zh, en], reason, { claims = null, verificationId = "", reasonCode = "" } = {}) {
  const panel = $("result");
  panel.dataset.outcome = outcome;
  panel.dataset.reason = reasonCode;
  $("result-title").replaceChildren(`${zh} `, el("span", { class: "en" }, en));
  $("result-reason").textContent = reason;
  const table = $("result-claims");
  const rows = Object.entries(claims || {});
  table.hidden = rows.length === 0;
  table.replaceChildren(...rows.map(([name, value]) => el("tr", { "data-claim": name }, el("td", {}, CLAIM_LABELS[name] || name), el("td", {}, value ?? "—"))));
  $("result-id").textContent = verificationId ? `核验号 verification ${verificationId}` : "";
}

function remember(outcome, label) {
  const item = el("li", { "data-outcome": outcome }, el("span", {}, label), el("span", { class: "meta" }, when(new Date().toISOString())));
  $("history").prepend(item);
  while ($("history").children.length > HISTORY_LENGTH) $("history").lastElementChild.remove();
}

function purposeText(purpose) {
  const [zh, en] = PURPOSES[purpose] || [purpose || "", ""];
  return `${zh} ${en}`.trim();
}

function showAnswer(answer) {
  const reasonCode = answer.reason || "";
  if (answer.result === "accepted" && !answer.repeated) {
    counts.accepted += 1;
    setResult("accepted", ["通过", "Accepted"], purposeText(answer.purpose), { claims: answer.claims, verificationId: answer.verification_id });
    remember("accepted", "通过 Accepted");
  } else if (answer.result === "accepted") {
    counts.repeats += 1;
    setResult("repeat", ["已通过（重复扫码）", "Already accepted (repeat)"], "本终端刚才已放行此二维码 · This terminal accepted this code a moment ago", {
      claims: answer.claims,
      verificationId: answer.verification_id,
    });
    remember("repeat", "重复 Repeat");
  } else {
    const [zh, en] = REASONS[reasonCode] || [reasonCode, ""];
    let detail = `${zh} · ${en}`;
    if (answer.first_used_at) detail += ` — 首次使用 first used ${when(answer.first_used_at)}`;
    if (answer.repeated) {
      counts.repeats += 1;
      detail += " (重复 repeat)";
    } else {
      counts.rejected += 1;
    }
    setResult("rejected", ["拒绝", "Rejected"], detail, { verificationId: answer.verification_id, reasonCode });
    remember("rejected", `拒绝 ${zh} ${en}`);
  }
  renderCounts();
}

/** Verify one scanned text and show the answer; scans made meanwhile wait their turn. */
function verify(text) {
  queue = queue.then(() => verifyNow(text)).catch(() => {});
  return queue;
}

async function verifyNow(text) {
  const credential = text.trim();
  if (!credential || !apiKey) return;
  setResult("wait", ["核验中…", "Checking…"], "");
  $("result").dataset.mode = $("offline-mode").checked ? "offline" : "online";
  $("result").dataset.alg = "";
  if ($("offline-mode").checked) {
    try {
      // Only line breaks are stripped: Base45 has a space in its alphabet (crypto/offline.py does the same).
      return showOffline(await verifyOffline(text.replace(/^[\r\n]+|[\r\n]+$/g, ""), kits, seenOffline));
    } catch (error) {
      setResult("error", ["请勿放行", "Do not admit"], `离线核验失败 · Offline verification failed: ${error.message}`);
      return remember("error", "错误 Error (offline)");
    }
  }
  try {
    const answer = await call("/v1/verify", { method: "POST", body: { credential }, headers: { "x-api-key": apiKey } });
    showAnswer(answer);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      signOut("终端密钥无效或终端已停用 · The API key was refused (unknown, rotated or disabled terminal)");
    } else if (error instanceof ApiError && error.status === 429) {
      setResult("wait", ["请稍候", "Too many scans"], `本终端核验过快，${error.retryAfter || 1} 秒后重试；二维码未被使用 · Over this terminal's rate: scan again in ${error.retryAfter || 1} s (the code was not used)`);
    } else if (error instanceof ApiError && (error.status === 400 || error.status === 413)) {
      counts.rejected += 1;
      renderCounts();
      setResult("rejected", ["拒绝", "Rejected"], "无法识别的二维码 · Not an eCard code", { reasonCode: "malformed" });
      remember("rejected", "拒绝 Not an eCard code");
    } else {
      const offline = error instanceof NetworkError;
      setResult("error", ["请勿放行", "Do not admit"], offline ? "无法连接服务 · The service cannot be reached" : `服务不可用 · Service unavailable: ${error.message}`);
      remember("error", "错误 Error");
    }
  }
}

/** An offline decision, shown like the service's answers (no claims: the kit has none to disclose). */
function showOffline(answer) {
  const reasonCode = answer.reason || "";
  const panel = $("result");
  if (answer.result === "accepted") {
    counts.accepted += 1;
    setResult("accepted", ["通过（离线）", "Accepted (offline)"], `${purposeText(answer.claims.purpose)} · ${answer.alg}`);
    remember("accepted", `通过 Accepted offline (${answer.alg})`);
  } else {
    const [zh, en] = REASONS[reasonCode] || OFFLINE_REASONS[reasonCode] || [reasonCode, ""];
    counts.rejected += 1;
    setResult("rejected", ["拒绝（离线）", "Rejected (offline)"], `${zh} · ${en} (${answer.detail})`, { reasonCode });
    remember("rejected", `拒绝 ${zh} ${en} (offline)`);
  }
  panel.dataset.alg = answer.alg || "";
  renderCounts();
}

const OFFLINE_REASONS = {
  lifetime_exceeded: ["有效期超长", "Valid for too long"],
  status_stale: ["离线包已过期", "Offline kit's status list has expired"],
};

async function addKit(document) {
  const kit = await loadKit(document);
  kits.set(kit.region, kit);
  $("offline-mode").disabled = false;
  $("kits").replaceChildren(
    ...[...kits.values()].map((one) => {
      const algorithms = [...new Set([...one.keys.values()].map((key) => (key.alg === -8 ? "Ed25519" : "SM2")))].join(", ");
      return el("li", { "data-region": one.region }, el("span", {}, `${one.region}: ${one.keys.size} 密钥 keys (${algorithms})`), el("span", { class: "meta" }, `状态表至 list until ${when(new Date(one.list.expiresAt * 1000).toISOString())}`));
    }),
  );
  say($("kit-message"), `已载入 ${kit.region} 的离线包 · Kit for ${kit.region} loaded`, "info");
}

async function fetchKit(event) {
  event.preventDefault();
  const region = $("kit-region").value.trim();
  if (!/^[1-9][0-9]{5}$/.test(region)) return say($("kit-message"), "地区代码为 6 位数字 · A region code has 6 digits", "error");
  try {
    await addKit(await call(`/v1/offline-kits/${region}`));
  } catch (error) {
    say($("kit-message"), `无法载入离线包 · Cannot load the kit: ${error.message}`, "error");
  }
}

async function readKitFile() {
  const file = $("kit-file").files[0];
  $("kit-file").value = "";
  if (!file) return;
  try {
    await addKit(JSON.parse(await file.text()));
  } catch (error) {
    say($("kit-message"), `无法载入离线包 · Cannot load the kit: ${error.message}`, "error");
  }
}

async function scanText(event) {
  event.preventDefault();
  const text = $("scan-text").value;
  $("scan-text").value = "";
  await verify(text);
  $("scan-text").focus();
}

async function scanFile() {
  const file = $("scan-file").files[0];
  $("scan-file").value = "";
  if (!file) return;
  say($("scan-message"), "");
  try {
    const text = await readQrFromFile(file);
    if (!text) return say($("scan-message"), "图片中未找到二维码 · No QR code found in the picture", "error");
    await verify(text);
  } catch (error) {
    say($("scan-message"), `无法读取图片 · Cannot read the picture: ${error.message}`, "error");
  }
}

async function startCamera() {
  if (!navigator.mediaDevices?.getUserMedia) {
    return say($("scan-message"), "摄像头需要 HTTPS 或 localhost · The camera needs HTTPS (or localhost)", "error");
  }
  try {
    const video = $("camera");
    video.hidden = false;
    stopCamera = await watchCamera(video, (text) => verify(text));
    $("camera-start").hidden = true;
    $("camera-stop").hidden = false;
    say($("scan-message"), `摄像头已打开（${await readerName()}） · Camera on (${await readerName()})`, "info");
  } catch (error) {
    $("camera").hidden = true;
    say($("scan-message"), `无法打开摄像头 · Cannot open the camera: ${error.message}`, "error");
  }
}

function endCamera() {
  stopCamera?.();
  stopCamera = null;
  $("camera").hidden = true;
  $("camera-start").hidden = false;
  $("camera-stop").hidden = true;
  say($("scan-message"), "");
}

function start() {
  $("signin-form").addEventListener("submit", signIn);
  $("scan-form").addEventListener("submit", scanText);
  // A USB or Bluetooth scanner types the code and presses Enter.
  $("scan-text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("scan-form").requestSubmit();
    }
  });
  $("scan-file").addEventListener("change", scanFile);
  $("kit-form").addEventListener("submit", fetchKit);
  $("kit-file").addEventListener("change", readKitFile);
  $("camera-start").addEventListener("click", startCamera);
  $("camera-stop").addEventListener("click", endCamera);
  $("sign-out").addEventListener("click", () => signOut(""));
  showView();
}

start();
