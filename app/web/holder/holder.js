// The holder's page: activation, the card, the live code, PIN, usage, devices, loss report.

import { ApiError, PURPOSES, REASONS, call, el, say, serverNow, when } from "/web/api.js";
import { createDeviceKey, dpopProof, forgetDeviceKey, loadDeviceKey, storeDeviceKey, unsupportedReason } from "/app/device-key.js";
import { LiveCode } from "/app/live-code.js";
import { SignedOut, clearSession, holderCall, loadSession, saveSession } from "/app/session.js";

const $ = (id) => document.getElementById(id);
const PURPOSE_KEY = "ecard.holder.purpose";
const CARD_STATES = {
  active: ["正常", "Active", "ok"],
  suspended: ["已暂停", "Suspended", "bad"],
  revoked: ["已注销", "Revoked", "bad"],
  pending_activation: ["待激活", "Not activated", "warn"],
};

let card = null;
let purpose = localStorage.getItem(PURPOSE_KEY) || "transit";
let tab = "code";

const live = new LiveCode(
  { frame: $("qr"), image: $("qr-image"), fill: $("qr-fill"), countdown: $("qr-countdown") },
  {
    onSuspended: () => loadCard(),
    onNeedPin: () => {
      say($("qr-message"), "医保结算二维码需要输入密码 · A medical code needs your PIN: tap “New code” to enter it", "warn");
      askForPin("step-up");
    },
    onSignedOut: (error) => signedOut(error.message),
    onMessage: (text, kind) => say($("qr-message"), text, kind),
  },
);

// ---- views -------------------------------------------------------------------------------------

function showView(name) {
  $("view-activate").hidden = name !== "activate";
  $("view-main").hidden = name !== "main";
  $("tabs").hidden = name !== "main";
  document.body.classList.toggle("has-tabs", name === "main");
}

function showTab(name) {
  tab = name;
  for (const button of $("tabs").querySelectorAll("button")) button.setAttribute("aria-selected", String(button.dataset.tab === name));
  for (const panel of ["code", "usage", "devices", "card"]) $(`tab-${panel}`).hidden = panel !== name;
  if (name === "code") updateCode();
  else live.pause();
  if (name === "usage") loadUsage();
  if (name === "devices") loadDevices();
  if (name === "card") loadCard();
}

function signedOut(reason) {
  live.stop();
  clearSession();
  card = null;
  showView("activate");
  say($("page-message"), reason ? `请重新激活 · Please activate again (${reason})` : "", "warn");
}

/** Run a holder action; a lost session sends the holder back to activation. */
async function guarded(work, messageElement) {
  try {
    return await work();
  } catch (error) {
    if (error instanceof SignedOut) signedOut(error.message);
    else say(messageElement || $("page-message"), error.message, "error");
    return undefined;
  }
}

// ---- activation --------------------------------------------------------------------------------

function defaultDeviceName() {
  const agent = navigator.userAgent;
  const browser = /Edg\//.test(agent) ? "Edge" : /Firefox\//.test(agent) ? "Firefox" : /Chrome\//.test(agent) ? "Chrome" : /Safari\//.test(agent) ? "Safari" : "Browser";
  const system = /Android/.test(agent) ? "Android" : /iPhone|iPad/.test(agent) ? "iOS" : /Mac OS/.test(agent) ? "macOS" : /Windows/.test(agent) ? "Windows" : /Linux/.test(agent) ? "Linux" : "";
  return system ? `${browser} on ${system}` : browser;
}

async function activate(event) {
  event.preventDefault();
  const message = $("activate-message");
  const button = $("activate-submit");
  button.disabled = true;
  say(message, "正在生成设备密钥… · Making the device key…", "info");
  try {
    const key = await createDeviceKey();
    // The proof, signed by the new key, shows the server that this device holds the key it registers.
    const answer = await call("/v1/holder/activation", {
      method: "POST",
      headers: { dpop: await dpopProof(key, "POST", "/v1/holder/activation", undefined, serverNow()) },
      body: {
        card_number: $("card-number").value.trim().toUpperCase(),
        activation_code: $("activation-code").value.trim(),
        device_public_key: key.publicKey,
        device_name: $("device-name").value.trim() || defaultDeviceName(),
      },
    });
    await storeDeviceKey(key);
    saveSession(answer, key.kind);
    $("activation-code").value = "";
    say(message, "");
    say($("page-message"), "");
    await enter();
  } catch (error) {
    const text =
      error instanceof ApiError && error.status === 401
        ? "卡号或激活码不正确（或已失效） · Card number or activation code not accepted (wrong, used or expired)"
        : error.message;
    say(message, text, "error");
  } finally {
    button.disabled = false;
  }
}

// ---- the card ----------------------------------------------------------------------------------

function stateBadge(element, state) {
  const [zh, en, kind] = CARD_STATES[state] || [state, state, "warn"];
  element.textContent = `${zh} ${en}`;
  element.className = `badge ${kind}`;
}

async function loadCard() {
  const loaded = await guarded(() => holderCall("/v1/holder/card"));
  if (!loaded) return;
  card = loaded;
  $("card-name").textContent = card.holder_name;
  $("card-number-masked").textContent = card.card_number;
  stateBadge($("card-state"), card.ecard_state);
  const facts = $("card-facts");
  facts.replaceChildren(
    ...[
      ["姓名 Name", card.holder_name],
      ["身份证号 Citizen ID", card.citizen_id],
      ["卡号 Card number", card.card_number],
      ["发卡地 Region", card.region],
      ["实体卡 Physical card", card.card_state],
      ["电子社保卡 eCard", card.ecard_state],
      ["密码 PIN", card.pin_locked ? "已锁定 locked" : card.pin_set ? "已设置 set" : "未设置 not set"],
    ].flatMap(([label, value]) => [el("dt", {}, label), el("dd", {}, value)]),
  );
  $("pin-change").replaceChildren(card.pin_set ? "修改密码 " : "设置密码 ", el("span", { class: "en" }, card.pin_set ? "Change PIN" : "Set PIN"));
  $("report-loss").disabled = card.ecard_state !== "active";
  updateCode();
}

function updateCode() {
  if (!card) return;
  const active = card.ecard_state === "active";
  $("card-suspended").hidden = active;
  $("code-panel").hidden = !active;
  if (!active) {
    live.stop();
    const lost = card.card_state === "lost";
    $("card-suspended-text").textContent =
      card.ecard_state === "revoked"
        ? "电子社保卡已注销。 The eCard was revoked."
        : lost
          ? "实体卡已挂失，所有二维码均已失效。 Your card is reported lost: no code works until the report is undone."
          : "电子社保卡已被社保经办机构暂停。 The card office suspended the eCard.";
    $("undo-loss").hidden = !(lost && card.ecard_state === "suspended");
    return;
  }
  if (tab === "code" && !live.timer) live.start(purpose);
}

function renderPurposes() {
  const group = $("purposes");
  group.replaceChildren(
    ...Object.entries(PURPOSES).map(([name, [zh, en]]) => {
      const button = el("button", { type: "button", "data-purpose": name, "aria-pressed": String(name === purpose) }, zh, el("br"), el("span", { class: "en" }, en));
      button.addEventListener("click", () => choosePurpose(name));
      return button;
    }),
  );
}

function choosePurpose(name) {
  purpose = name;
  localStorage.setItem(PURPOSE_KEY, name);
  renderPurposes();
  say($("qr-message"), "");
  live.start(name);
}

// ---- PIN ---------------------------------------------------------------------------------------

let pinMode = "step-up";

/** Open the PIN dialog: "step-up" (enter it for a medical code or undoing a loss), "set", "change". */
function askForPin(mode) {
  pinMode = mode === "step-up" && card && !card.pin_set ? "setup" : mode;
  const titles = {
    "step-up": ["输入支付密码", "Enter your PIN"],
    setup: ["设置支付密码", "Set a PIN first"],
    set: ["设置支付密码", "Set your PIN"],
    change: ["修改支付密码", "Change your PIN"],
  };
  const [zh, en] = titles[pinMode];
  $("pin-title").replaceChildren(`${zh} `, el("span", { class: "en" }, en));
  $("pin-hint").textContent =
    pinMode === "step-up"
      ? "医保结算二维码需验证密码（5分钟内有效）。 Medical codes need your PIN (valid for 5 minutes)."
      : "6位数字，不要使用123456等简单密码。 Six digits, not a trivial one like 123456.";
  $("pin-current-row").hidden = pinMode !== "change";
  $("pin-confirm-row").hidden = pinMode === "step-up";
  for (const id of ["pin-current", "pin-input", "pin-confirm"]) $(id).value = "";
  say($("pin-message"), "");
  if (!$("pin-dialog").open) $("pin-dialog").showModal();
  $(pinMode === "change" ? "pin-current" : "pin-input").focus();
}

async function submitPin(event) {
  event.preventDefault();
  const pin = $("pin-input").value.trim();
  const message = $("pin-message");
  if (!/^[0-9]{6}$/.test(pin)) return say(message, "请输入6位数字 · Enter six digits", "error");
  if (pinMode !== "step-up" && pin !== $("pin-confirm").value.trim()) return say(message, "两次输入不一致 · The two PINs differ", "error");
  $("pin-submit").disabled = true;
  try {
    if (pinMode !== "step-up") {
      const body = { pin };
      if (pinMode === "change") body.current_pin = $("pin-current").value.trim();
      await holderCall("/v1/holder/pin", { method: "PUT", body });
      if (card) card.pin_set = true;
    }
    if (pinMode === "step-up" || pinMode === "setup") {
      const stepUp = await holderCall("/v1/holder/pin/verification", { method: "POST", body: { pin } });
      live.setStepUp(stepUp.step_up_token, stepUp.expires_in);
      pendingStepUp?.(stepUp.step_up_token);
      pendingStepUp = null;
    }
    $("pin-dialog").close();
    if (pinMode === "set" || pinMode === "change") loadCard();
  } catch (error) {
    if (error instanceof SignedOut) {
      $("pin-dialog").close();
      signedOut(error.message);
    } else {
      say(message, error.message, "error");
    }
  } finally {
    $("pin-submit").disabled = false;
  }
}

let pendingStepUp = null;

/** A step-up token: the live one, or one the holder enters now. */
function stepUpToken() {
  if (live.hasStepUp()) return Promise.resolve(live.stepUp.token);
  return new Promise((resolve) => {
    pendingStepUp = resolve;
    askForPin("step-up");
  });
}

// ---- loss --------------------------------------------------------------------------------------

function confirmAction(title, text) {
  const dialog = $("confirm-dialog");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    const done = (answer) => {
      $("confirm-form").onsubmit = null;
      $("confirm-no").onclick = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    $("confirm-form").onsubmit = (event) => {
      event.preventDefault();
      done(true);
    };
    $("confirm-no").onclick = () => done(false);
    dialog.onclose = () => done(false);
    dialog.showModal();
  });
}

async function reportLoss() {
  const sure = await confirmAction(
    "挂失社保卡？ Report your card lost?",
    "电子社保卡将立即停止使用，已显示的二维码全部失效。 The eCard stops at once; no code already shown will be accepted.",
  );
  if (!sure) return;
  await guarded(async () => {
    await holderCall("/v1/holder/card/loss", { method: "POST", body: { reason: "reported lost by the holder" } });
    live.stop();
    await loadCard();
    showTab("code");
  });
}

async function undoLoss() {
  await guarded(async () => {
    const body = {};
    if (card?.pin_set) {
      body.step_up_token = await stepUpToken();
      if (!body.step_up_token) return;
    }
    await holderCall("/v1/holder/card/loss/undo", { method: "POST", body });
    await loadCard();
  });
}

// ---- usage and devices -------------------------------------------------------------------------

async function loadUsage() {
  const entries = await guarded(() => holderCall("/v1/holder/usage?limit=30"), $("usage-message"));
  if (!entries) return;
  say($("usage-message"), entries.length ? "" : "暂无记录（使用后几秒内出现） · Nothing yet (a use appears a few seconds after the scan)", "info");
  $("usage-list").replaceChildren(
    ...entries.map((entry) => {
      const accepted = entry.result === "accepted";
      const [purposeZh, purposeEn] = PURPOSES[entry.purpose] || [entry.purpose || "", ""];
      const [reasonZh, reasonEn] = REASONS[entry.result] || [entry.result, ""];
      return el(
        "li",
        { "data-result": entry.result },
        el("div", {}, entry.organisation, el("div", { class: "meta" }, `${when(entry.occurred_at)} · ${purposeZh} ${purposeEn}`)),
        el("span", { class: `badge ${accepted ? "ok" : "bad"}` }, accepted ? "成功 Accepted" : `${reasonZh} ${reasonEn}`.trim()),
      );
    }),
  );
}

async function loadDevices() {
  const devices = await guarded(() => holderCall("/v1/holder/devices"), $("device-message"));
  if (!devices) return;
  say($("device-message"), "");
  $("device-list").replaceChildren(
    ...devices.map((device) => {
      const rename = el("button", { type: "button", class: "small secondary", "data-action": "rename" }, "改名 Rename");
      const remove = el("button", { type: "button", class: "small danger", "data-action": "remove" }, "解绑 Remove");
      rename.addEventListener("click", () => renameDevice(device));
      remove.addEventListener("click", () => removeDevice(device));
      return el(
        "li",
        { "data-device": device.id, "data-current": device.current ? "true" : null },
        el("div", {}, device.name, " ", device.current ? el("span", { class: "badge ok" }, "本机 This device") : null, el("div", { class: "meta" }, `绑定于 bound ${when(device.created_at)}`)),
        el("div", {}, rename, " ", remove),
      );
    }),
  );
}

function renameDevice(device) {
  const dialog = $("rename-dialog");
  $("rename-input").value = device.name;
  say($("rename-message"), "");
  $("rename-form").onsubmit = async (event) => {
    event.preventDefault();
    const name = $("rename-input").value.trim();
    if (!name) return;
    const done = await guarded(() => holderCall(`/v1/holder/devices/${device.id}`, { method: "PATCH", body: { name } }), $("rename-message"));
    if (done) {
      dialog.close();
      loadDevices();
    }
  };
  $("rename-cancel").onclick = () => dialog.close();
  dialog.showModal();
}

async function removeDevice(device) {
  const sure = await confirmAction(
    "解绑设备？ Remove this device?",
    device.current
      ? "本机将退出，需要重新激活。 This device signs out and needs a new activation."
      : `“${device.name}”将立即无法使用电子社保卡。 "${device.name}" can no longer use the eCard, from now on.`,
  );
  if (!sure) return;
  const done = await guarded(() => holderCall(`/v1/holder/devices/${device.id}`, { method: "DELETE" }).then(() => true), $("device-message"));
  if (!done) return;
  if (device.current) {
    await forgetDeviceKey();
    signedOut("");
  } else {
    loadDevices();
  }
}

async function signOut() {
  const session = loadSession();
  if (session) {
    try {
      await holderCall(`/v1/holder/devices/${session.device_id}`, { method: "DELETE" });
    } catch {
      // offline or already gone: forget it here anyway; the office or another device can remove it
    }
  }
  await forgetDeviceKey();
  signedOut("");
}

// ---- start -------------------------------------------------------------------------------------

async function enter() {
  showView("main");
  const key = await loadDeviceKey().catch(() => undefined);
  $("key-kind").textContent =
    key?.kind === "noble"
      ? "设备密钥：兼容模式（浏览器不支持 WebCrypto Ed25519） · Device key: compatibility mode (this browser has no WebCrypto Ed25519; the key is stored as page data)"
      : "设备密钥：由浏览器保管，不可导出 · Device key: kept by the browser (WebCrypto Ed25519, not exportable)";
  renderPurposes();
  showTab("code");
  await loadCard();
}

function start() {
  for (const button of $("tabs").querySelectorAll("button")) button.addEventListener("click", () => showTab(button.dataset.tab));
  $("activate-form").addEventListener("submit", activate);
  $("pin-form").addEventListener("submit", submitPin);
  $("pin-cancel").addEventListener("click", () => $("pin-dialog").close());
  // Cancelled (button or Escape): whoever waited for a step-up gets none.
  $("pin-dialog").addEventListener("close", () => {
    pendingStepUp?.(null);
    pendingStepUp = null;
  });
  $("qr-refresh").addEventListener("click", () => live.refreshNow());
  $("report-loss").addEventListener("click", reportLoss);
  $("undo-loss").addEventListener("click", undoLoss);
  $("usage-reload").addEventListener("click", loadUsage);
  $("pin-change").addEventListener("click", () => askForPin(card?.pin_set ? "change" : "set"));
  $("sign-out").addEventListener("click", signOut);
  // Another tab signed out or activated again.
  window.addEventListener("storage", (event) => {
    if (event.key === "ecard.holder.session" && !event.newValue) signedOut("");
  });
  const unsupported = unsupportedReason();
  if (unsupported) {
    say($("activate-message"), unsupported, "error");
    $("activate-submit").disabled = true;
  }
  $("device-name").placeholder = defaultDeviceName();
  if (loadSession()) enter();
  else showView("activate");
}

start();
