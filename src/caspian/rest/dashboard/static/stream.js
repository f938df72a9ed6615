// One WebSocket to /v1/stream shared by every panel: subscriptions, token
// refresh on the open connection, and reconnects with backoff that resubscribe
// everything.
//
// Pings need no code here: the server's heartbeat is WebSocket ping frames, and
// every browser answers those with pongs by itself (RFC 6455 requires it of the
// client's WebSocket implementation; scripts never see control frames).

import { ApiError } from "./api.js";
import { backoffDelay, refreshDelay, uuid4 } from "./book.js";

// Close codes after which the token in hand will not be taken again: no token,
// invalid or revoked, expired, the session ended on the server.
const NEEDS_LOGIN = new Set([3000, 3001, 3002, 3003]);

// A connection that stayed up this long starts the backoff again from its
// first step when it drops.
const STABLE_MS = 10000;

export class Stream extends EventTarget {
  constructor(session, url) {
    super();
    this.session = session;
    this.url = url;
    this.subscriptions = new Set();
    this.byRequestId = new Map();
    this.ws = null;
    this.stopped = true;
    this.attempt = 0;
    this.connections = 0;
    this.reconnects = 0;
    this.refreshes = 0;
    this.openedAt = 0;
    this.reconnectTimer = null;
    this.refreshTimer = null;
    this.pendingRefresh = null;
  }

  // Subscribes now if connected, and again after every reconnect.
  // handlers: onRestart() (a new subscription starts: drop the book),
  // onResponse(code, message), onData(message).
  subscribe(payload, handlers) {
    const subscription = { payload, handlers, requestId: null };
    this.subscriptions.add(subscription);
    if (this.ws !== null && this.ws.readyState === WebSocket.OPEN) {
      this.#sendSubscribe(subscription);
    }
    return {
      close: () => {
        this.subscriptions.delete(subscription);
        if (subscription.requestId !== null) {
          this.byRequestId.delete(subscription.requestId);
          if (this.ws !== null && this.ws.readyState === WebSocket.OPEN) {
            this.#send("Unsubscribe", { subscribeRequestId: subscription.requestId });
          }
        }
      },
    };
  }

  start() {
    this.stopped = false;
    this.#scheduleRefresh();
    this.#connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.refreshTimer);
    if (this.ws !== null) {
      this.ws.close(1000, "Signed out");
      this.ws = null;
    }
    this.#state("stopped", {});
  }

  #state(state, detail) {
    this.dispatchEvent(new CustomEvent("state", { detail: { state, ...detail } }));
  }

  #send(type, payload) {
    const requestId = uuid4();
    this.ws.send(JSON.stringify({ requestId, type, payload }));
    return requestId;
  }

  #sendSubscribe(subscription) {
    subscription.handlers.onRestart();
    subscription.requestId = this.#send("Subscribe", subscription.payload);
    this.byRequestId.set(subscription.requestId, subscription);
  }

  #connect() {
    const url = new URL(this.url);
    url.searchParams.set("accessToken", this.session.token);
    this.#state("connecting", { attempt: this.attempt });
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.onopen = () => {
      if (ws !== this.ws) {
        return;
      }
      this.openedAt = Date.now();
      this.connections += 1;
      if (this.connections > 1) {
        this.reconnects += 1;
      }
      this.byRequestId.clear();
      this.pendingRefresh = null;
      this.#state("open", { reconnects: this.reconnects });
      for (const subscription of this.subscriptions) {
        this.#sendSubscribe(subscription);
      }
    };
    ws.onmessage = (event) => {
      if (ws === this.ws) {
        this.#receive(event.data);
      }
    };
    ws.onclose = (event) => {
      if (ws === this.ws) {
        this.#closed(event.code, event.reason);
      }
    };
  }

  #receive(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      const detail = { code: null, message: "a message from the server that is not JSON was ignored" };
      this.dispatchEvent(new CustomEvent("protocol-error", { detail }));
      return;
    }
    const { requestId, type } = message;
    if (type === "TokenRefreshResponse" && requestId === this.pendingRefresh) {
      this.pendingRefresh = null;
      const { code, message: text } = message.payload ?? {};
      if (code === 200) {
        this.refreshes += 1;
      }
      this.dispatchEvent(new CustomEvent("refresh", { detail: { code, message: text, refreshes: this.refreshes } }));
      return;
    }
    if (type === "ProtocolError") {
      const { code, message: text } = message.payload ?? {};
      this.dispatchEvent(new CustomEvent("protocol-error", { detail: { code, message: text } }));
      return;
    }
    const subscription = this.byRequestId.get(requestId);
    if (subscription === undefined) {
      return;
    }
    if (type === "SubscribeResponse") {
      const { code, message: text } = message.payload ?? {};
      if (code !== 200) {
        // Refused, or ended by the server (205 when an entitlement is revoked):
        // nothing more comes under this requestId.
        this.byRequestId.delete(requestId);
      }
      subscription.handlers.onResponse(code, text);
    } else if (type === "Level1" || type === "Level2") {
      subscription.handlers.onData(message);
    }
  }

  #closed(code, reason) {
    this.ws = null;
    this.pendingRefresh = null;
    if (this.stopped) {
      return;
    }
    if (this.openedAt !== 0 && Date.now() - this.openedAt >= STABLE_MS) {
      this.attempt = 0;
    }
    this.openedAt = 0;
    const login = NEEDS_LOGIN.has(code) || !(Date.now() < this.session.expirationMs);
    this.#retry(code, reason, login, backoffDelay(this.attempt));
    this.attempt += 1;
  }

  // note: why the last try failed, beside the close that started the retries.
  #retry(code, reason, login, delay, note = "") {
    const shown = note ? `${reason}; ${note}` : reason;
    this.#state("waiting", { code, reason: shown, delay, reconnects: this.reconnects });
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(async () => {
      if (this.stopped) {
        return;
      }
      if (login) {
        try {
          await this.session.login();
        } catch (error) {
          this.#loginFailed(error, code, reason);
          return;
        }
        // Signed out while the login was under way.
        if (this.stopped) {
          return;
        }
        this.#scheduleRefresh();
      }
      this.#connect();
    }, delay);
  }

  #loginFailed(error, code, reason) {
    if (this.stopped) {
      return;
    }
    if (error instanceof ApiError && error.status === 401) {
      // The key was revoked or the user disabled: retrying cannot help.
      this.stop();
      this.dispatchEvent(new CustomEvent("signed-out", { detail: { message: error.message } }));
      return;
    }
    const delay =
      error instanceof ApiError && error.retryAfter !== null
        ? error.retryAfter * 1000
        : backoffDelay(this.attempt);
    this.attempt += 1;
    this.#retry(code, reason, true, delay, `login failed: ${error.message}`);
  }

  #scheduleRefresh() {
    clearTimeout(this.refreshTimer);
    if (!Number.isFinite(this.session.expirationMs)) {
      return;
    }
    const delay = refreshDelay(this.session.expirationMs, Date.now());
    this.refreshTimer = setTimeout(() => this.#refresh(), delay);
  }

  async #refresh() {
    if (this.stopped) {
      return;
    }
    try {
      await this.session.login();
    } catch (error) {
      if (this.stopped) {
        return;
      }
      this.dispatchEvent(new CustomEvent("refresh", { detail: { code: null, message: error.message } }));
      if (error instanceof ApiError && error.status === 401) {
        return;
      }
      clearTimeout(this.refreshTimer);
      this.refreshTimer = setTimeout(() => this.#refresh(), error.retryAfter ? error.retryAfter * 1000 : 5000);
      return;
    }
    if (this.stopped) {
      return;
    }
    if (this.ws !== null && this.ws.readyState === WebSocket.OPEN) {
      this.pendingRefresh = this.#send("TokenRefresh", { accessToken: this.session.token });
    }
    // Closed meanwhile: the next connection opens with the new token.
    this.#scheduleRefresh();
  }
}
