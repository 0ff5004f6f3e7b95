// Reading QR codes from the camera or a picture: the browser's BarcodeDetector where it has one
// (Chrome on Android, ChromeOS and macOS; Safari), otherwise the vendored jsQR, loaded on first use.

const JSQR_URL = "/web/vendor/jsQR.js";
const MAX_SIDE = 1024; // jsQR reads a code filling part of a picture well at this size, and fast
const FRAME_MS = 200;

let detectorPromise = null;
let jsQrPromise = null;

async function nativeDetector() {
  if (!("BarcodeDetector" in globalThis)) return null;
  try {
    const formats = await BarcodeDetector.getSupportedFormats();
    return formats.includes("qr_code") ? new BarcodeDetector({ formats: ["qr_code"] }) : null;
  } catch {
    return null;
  }
}

function loadJsQr() {
  if (globalThis.jsQR) return Promise.resolve(globalThis.jsQR);
  jsQrPromise ??= new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = JSQR_URL;
    script.onload = () => (globalThis.jsQR ? resolve(globalThis.jsQR) : reject(new Error("jsQR did not load")));
    script.onerror = () => {
      jsQrPromise = null;
      reject(new Error("the QR reader could not be loaded"));
    };
    document.head.append(script);
  });
  return jsQrPromise;
}

/** Which reader this browser uses: "BarcodeDetector" or "jsQR". */
export async function readerName() {
  detectorPromise ??= nativeDetector();
  return (await detectorPromise) ? "BarcodeDetector" : "jsQR";
}

const canvas = document.createElement("canvas");
const context2d = canvas.getContext("2d", { willReadFrequently: true });

/** The text of the first QR code in an image source (ImageBitmap, video, image), or null. */
export async function readQr(source, width, height) {
  detectorPromise ??= nativeDetector();
  const detector = await detectorPromise;
  if (detector) {
    const codes = await detector.detect(source);
    return codes.length ? codes[0].rawValue : null;
  }
  const jsQR = await loadJsQr();
  const scale = Math.min(1, MAX_SIDE / Math.max(width, height));
  canvas.width = Math.max(1, Math.round(width * scale));
  canvas.height = Math.max(1, Math.round(height * scale));
  context2d.imageSmoothingEnabled = scale < 1;
  context2d.drawImage(source, 0, 0, canvas.width, canvas.height);
  const pixels = context2d.getImageData(0, 0, canvas.width, canvas.height);
  const code = jsQR(pixels.data, pixels.width, pixels.height, { inversionAttempts: "attemptBoth" });
  return code ? code.data : null;
}

/** The text of the QR code in a picture file, or null. */
export async function readQrFromFile(file) {
  const bitmap = await createImageBitmap(file);
  try {
    return await readQr(bitmap, bitmap.width, bitmap.height);
  } finally {
    bitmap.close();
  }
}

/**
 * Watch the camera and call onCode(text) for each code seen; the returned function stops it.
 * A code is reported once: it stays in front of the lens for a while, and a credential lives
 * 60 s, so one seen in the last `quietMs` is not sent again (paste it to ask again).
 */
export async function watchCamera(video, onCode, { quietMs = 60_000 } = {}) {
  const stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
  video.srcObject = stream;
  await video.play();
  let stopped = false;
  const seen = new Map(); // text → when it was first reported
  let timer = null;
  const scan = async () => {
    if (stopped) return;
    try {
      if (video.readyState >= 2) {
        const text = await readQr(video, video.videoWidth, video.videoHeight);
        const now = Date.now();
        for (const [old, at] of seen) if (now - at >= quietMs) seen.delete(old);
        if (text && !seen.has(text)) {
          seen.set(text, now);
          onCode(text);
        }
      }
    } catch {
      // a frame that cannot be read: try the next one
    }
    if (!stopped) timer = setTimeout(scan, FRAME_MS);
  };
  scan();
  return () => {
    stopped = true;
    clearTimeout(timer);
    for (const track of stream.getTracks()) track.stop();
    video.srcObject = null;
  };
}
