// Reading user media in the browser: images as data: URLs (sent as they are), videos as evenly spaced
// frames (the midpoints of equal segments, like InternVL's get_index) drawn to a canvas and sent as JPEG images.

export const FRAME_MAX_SIDE = 896; // a frame becomes one 448×448 tile; more pixels only cost bytes

export class MediaError extends Error {
  constructor(message) {
    super(message);
    this.name = "MediaError";
  }
}

/** "1.4 MB" style sizes for messages. */
export function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(n < 10 * 1024 ? 1 : 0)} KB`;
  return `${(n / (1024 * 1024)).toFixed(1)} MB`;
}

/** Bytes a file takes in a JSON body as a base64 data: URL (4/3 of the file plus the header). */
export function dataUrlBytes(file) {
  return Math.ceil(file.size / 3) * 4 + `data:${file.type};base64,`.length;
}

export function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new MediaError(`cannot read ${file.name}: ${reader.error?.message ?? "unknown error"}`));
    reader.readAsDataURL(file);
  });
}

/** Resolve when `element` fires `ok`, reject with `message` on `error` or after `timeoutMs`. */
function once(element, ok, message, timeoutMs = 15000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => finish(new MediaError(`${message} (timed out)`)), timeoutMs);
    const onOk = () => finish(null);
    const onError = () => finish(new MediaError(message));
    function finish(error) {
      clearTimeout(timer);
      element.removeEventListener(ok, onOk);
      element.removeEventListener("error", onError);
      if (error) reject(error);
      else resolve();
    }
    element.addEventListener(ok, onOk);
    element.addEventListener("error", onError);
  });
}

/** Seconds at which to sample `count` frames of a `duration`-second clip: segment midpoints. */
export function frameTimes(duration, count) {
  const segment = duration / count;
  return Array.from({ length: count }, (_, i) => (i + 0.5) * segment);
}

/**
 * Resolves once `video` presents its next frame (or after `timeoutMs`). Chrome may fire "seeked" before the
 * sought frame replaces the old one, and drawing then copies the previous frame; registered before the seek
 * (the element is paused, so the next frame presented is the sought one), this waits for the right one.
 * Browsers without frame callbacks resolve at once.
 */
function nextFramePresented(video, timeoutMs = 500) {
  if (typeof video.requestVideoFrameCallback !== "function") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, timeoutMs);
    video.requestVideoFrameCallback(() => {
      clearTimeout(timer);
      resolve();
    });
  });
}

/** Sample `count` frames of a video file; returns {frames: [dataUrl], width, height, duration}. */
export async function sampleVideo(file, count) {
  const url = URL.createObjectURL(file);
  const video = document.createElement("video");
  video.muted = true;
  video.preload = "auto";
  video.playsInline = true;
  try {
    video.src = url;
    await once(video, "loadeddata", `${file.name}: this browser cannot decode the video`);
    const duration = video.duration;
    if (!Number.isFinite(duration) || duration <= 0) {
      throw new MediaError(`${file.name}: the video's length is unknown, so frames cannot be sampled`);
    }
    const scale = Math.min(1, FRAME_MAX_SIDE / Math.max(video.videoWidth, video.videoHeight));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(video.videoWidth * scale));
    canvas.height = Math.max(1, Math.round(video.videoHeight * scale));
    const ctx = canvas.getContext("2d");
    const frames = [];
    for (const time of frameTimes(duration, count)) {
      const seeked = once(video, "seeked", `${file.name}: cannot seek to ${time.toFixed(2)} s`);
      const presented = nextFramePresented(video);
      video.currentTime = time;
      await seeked;
      await presented;
      ctx.drawImage(video, 0, 0, canvas.width, canvas.height);
      frames.push(canvas.toDataURL("image/jpeg", 0.9));
    }
    return { frames, width: canvas.width, height: canvas.height, duration };
  } finally {
    video.removeAttribute("src");
    video.load();
    URL.revokeObjectURL(url);
  }
}

/** Load a data: URL into an <img> (resolves once decoded, so its natural size is known). */
export async function loadImage(src, name = "image") {
  const image = new Image();
  image.src = src;
  try {
    await image.decode();
  } catch {
    throw new MediaError(`${name}: this browser cannot display the image`);
  }
  return image;
}
