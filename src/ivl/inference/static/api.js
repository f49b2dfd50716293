// The OpenAI chat-completions protocol, streaming: POST JSON, read server-sent events until "data: [DONE]".
// Errors, whether an HTTP status or an in-band {"error": ...} event, become ApiError with a readable message.

export class ApiError extends Error {
  constructor(message, { status = 0, code = null, type = null, param = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.type = type;
    this.param = param;
  }
}

const REASONS = {
  400: "Bad request",
  401: "Unauthorized",
  403: "Forbidden",
  404: "Not found",
  413: "Request too large",
  422: "Invalid request",
  429: "Server busy",
  500: "Server error",
  502: "Bad gateway",
  503: "Service unavailable",
  504: "Gateway timeout",
};

function fromErrorBody(body, status) {
  // OpenAI style {"error": {...}}; FastAPI style {"detail": ...}
  const error = body && typeof body === "object" ? body.error ?? null : null;
  if (error && typeof error === "object") {
    return new ApiError(String(error.message ?? "unknown error"), {
      status,
      code: error.code ?? null,
      type: error.type ?? null,
      param: error.param ?? null,
    });
  }
  if (typeof error === "string") return new ApiError(error, { status });
  if (body && body.detail !== undefined) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    return new ApiError(detail, { status });
  }
  return null;
}

/** An ApiError from a failed HTTP response, whatever its body (JSON, HTML from a proxy, or nothing). */
export async function errorFromResponse(response) {
  const text = await response.text().catch(() => "");
  let parsed = null;
  try {
    parsed = fromErrorBody(JSON.parse(text), response.status);
  } catch {
    parsed = null;
  }
  if (parsed) return parsed;
  const plain = text.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim().slice(0, 300);
  const reason = response.statusText || REASONS[response.status] || "HTTP error";
  return new ApiError(plain ? `${reason}: ${plain}` : reason, { status: response.status });
}

/** "Request too large (413, request_too_large): <message>" — what the page shows for an ApiError. */
export function describeError(error) {
  if (!(error instanceof ApiError)) return `Unexpected error: ${error?.message ?? error}`;
  if (error.status === 0) return error.message;
  const reason = REASONS[error.status] ?? (error.status >= 500 ? "Server error" : "Request failed");
  const where = [String(error.status), error.code].filter(Boolean).join(", ");
  return `${reason} (${where}): ${error.message}`;
}

// An event ends at a blank line; accept \n, \r\n and \r line ends.
const EVENT_END = /\r\n\r\n|\n\n|\r\r/;

function parseEvent(block) {
  const data = [];
  for (const line of block.split(/\r\n|\n|\r/)) {
    if (line.startsWith("data:")) data.push(line.slice(line[5] === " " ? 6 : 5));
  }
  return data.length ? data.join("\n") : null;
}

/**
 * POST `body` (a JSON string) to `url` and yield each chunk object of the stream.
 * Throws ApiError for HTTP errors, in-band errors and unreadable streams; lets AbortError through.
 */
export async function* streamChat({ url, body, apiKey = null, signal = undefined }) {
  const headers = { "Content-Type": "application/json", Accept: "text/event-stream" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  let response;
  try {
    response = await fetch(url, { method: "POST", headers, body, signal });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(`Cannot reach the server (${error.message}). Is it still running?`);
  }
  if (!response.ok) throw await errorFromResponse(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let match;
      while ((match = EVENT_END.exec(buffer)) !== null) {
        const data = parseEvent(buffer.slice(0, match.index));
        buffer = buffer.slice(match.index + match[0].length);
        if (data === null) continue;
        if (data.trim() === "[DONE]") return;
        let chunk;
        try {
          chunk = JSON.parse(data);
        } catch {
          throw new ApiError(`the server sent an unreadable event: ${data.slice(0, 200)}`, { status: 502 });
        }
        const inBand = fromErrorBody(chunk, 0);
        if (inBand) {
          // a stream has already answered 200: take the status the error body implies
          inBand.status = inBand.type === "server_error" ? 500 : inBand.type === "rate_limit_error" ? 429 : 400;
          throw inBand;
        }
        yield chunk;
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // the consumer may stop early: close the connection (the server cancels)
  }
  if (buffer.trim()) {
    const data = parseEvent(buffer);
    if (data !== null && data.trim() !== "[DONE]") {
      throw new ApiError("the answer stream ended in the middle of an event", { status: 502 });
    }
  }
}
