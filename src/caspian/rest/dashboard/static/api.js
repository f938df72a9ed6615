// The public REST API: login and reference data. URLs are resolved against the
// page's own, so the dashboard works wherever the service is reached (behind a
// proxy too).

import { parseTimestamp } from "./book.js";

const API = new URL("../v1/", document.baseURI);

// An error answer of the API: its HTTP status, the documented code and message,
// and Retry-After in seconds when the service gave one (429, 503).
export class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(code === null ? message : `${code} ${message}`);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

async function request(method, path, { token = null, body = undefined } = {}) {
  const headers = {};
  if (token !== null) {
    headers.Authorization = `Bearer ${token}`;
  }
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(new URL(path, API), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
    });
  } catch (error) {
    throw new ApiError(0, null, `the service cannot be reached (${error.message})`, null);
  }
  const text = await response.text();
  let content = null;
  try {
    content = text ? JSON.parse(text) : null;
  } catch {
    content = null;
  }
  if (!response.ok) {
    const retry = Number(response.headers.get("Retry-After"));
    const retryAfter = Number.isFinite(retry) && retry > 0 ? retry : null;
    if (content && typeof content.code === "number") {
      throw new ApiError(response.status, content.code, String(content.message), retryAfter);
    }
    // A failed login is a bare 401, as the original documents.
    const message = response.status === 401 ? "Incorrect credentials or key" : response.statusText;
    throw new ApiError(response.status, null, `${response.status} ${message}`, retryAfter);
  }
  return content;
}

// A signed-in user. The key or password is kept in this object, in memory
// only (never in localStorage or a cookie), because a new token can only be had
// by logging in again; signing out or closing the tab forgets both.
export class Session {
  // credentials: {type: "Key", keyId, secret} or {type: "Credential", user, password}
  constructor(credentials) {
    this.body =
      credentials.type === "Key"
        ? { type: "Key", payload: { accessKeyID: credentials.keyId, secretAccessKey: credentials.secret } }
        : { type: "Credential", payload: { user: credentials.user, pass: credentials.password } };
    this.name = credentials.type === "Key" ? credentials.keyId : credentials.user;
    this.token = null;
    this.expiration = null;
    this.expirationMs = Number.NaN;
  }

  // Logs in; the new token is kept and returned.
  async login() {
    const answer = await request("POST", "auth/authenticate", { body: this.body });
    if (!answer || typeof answer.accessToken !== "string") {
      throw new ApiError(200, null, "the login answer holds no accessToken", null);
    }
    this.token = answer.accessToken;
    this.expiration = answer.expiration;
    this.expirationMs = parseTimestamp(answer.expiration);
    return this.token;
  }

  // A reference-data call; a token refused as expired or revoked gets one new
  // login and one more try.
  async call(method, path, body) {
    try {
      return await request(method, path, { token: this.token, body });
    } catch (error) {
      if (!(error instanceof ApiError) || error.status !== 401) {
        throw error;
      }
      await this.login();
      return request(method, path, { token: this.token, body });
    }
  }

  exchanges() {
    return this.call("GET", "reference/exchanges");
  }

  products(codes) {
    return this.call("POST", "reference/products", { exchanges: codes });
  }

  forget() {
    this.body = null;
    this.token = null;
  }
}

// The stream's URL, beside the REST API on the same host and port.
export function streamUrl() {
  const url = new URL("stream", API);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url;
}
