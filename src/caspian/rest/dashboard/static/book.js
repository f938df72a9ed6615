// Pure logic of the dashboard, free of I/O: the Level2 book, timestamps, backoff
// and token refresh timing. The end-to-end test imports this module in the
// browser and checks it directly.

// A Level2 book kept from one subscription's messages. The first non-empty
// payload after a Subscribe is the whole top-N; after it come changes only,
// size 0 removing a level. Until that whole top-N has come the book is not
// shown, so a book is never built across a gap.
export class Book {
  constructor() {
    this.bids = new Map();
    this.asks = new Map();
    this.whole = false;
    this.depthStream = null;
    this.caspianTimestamp = null;
    this.exchangeTimestamp = null;
    this.updates = 0;
  }

  // Forget everything: the next non-empty payload starts the book again.
  restart() {
    this.bids.clear();
    this.asks.clear();
    this.whole = false;
    this.caspianTimestamp = null;
    this.exchangeTimestamp = null;
  }

  // Applies one Level2 message; true when the book or its status changed.
  apply(message) {
    const payload = Array.isArray(message.payload) ? message.payload : [];
    const statusChanged = message.depthStream !== undefined && message.depthStream !== this.depthStream;
    if (message.depthStream !== undefined) {
      this.depthStream = message.depthStream;
    }
    if (payload.length === 0) {
      return statusChanged;
    }
    if (!this.whole) {
      this.bids.clear();
      this.asks.clear();
      this.whole = true;
    }
    for (const level of payload) {
      const side = level.side === "bid" ? this.bids : level.side === "ask" ? this.asks : null;
      const price = Number(level.price);
      const size = Number(level.size);
      // A level the page cannot read is left out rather than shown wrong.
      if (side === null || !Number.isFinite(price) || !Number.isFinite(size)) {
        continue;
      }
      if (size === 0) {
        side.delete(price);
      } else {
        side.set(price, size);
      }
    }
    this.caspianTimestamp = message.caspianTimestamp ?? this.caspianTimestamp;
    this.exchangeTimestamp = message.exchangeTimestamp ?? null;
    this.updates += 1;
    return true;
  }

  // [[price, size], ...], best first.
  sortedBids() {
    return [...this.bids.entries()].sort((a, b) => b[0] - a[0]);
  }

  sortedAsks() {
    return [...this.asks.entries()].sort((a, b) => a[0] - b[0]);
  }
}

// Cumulative sizes from the best price outwards: [[price, total], ...].
export function cumulative(levels) {
  let total = 0;
  return levels.map(([price, size]) => {
    total += size;
    return [price, total];
  });
}

// Milliseconds since the epoch of a Caspian timestamp (GMT, no zone suffix:
// YYYY-MM-DDTHH:MM:SS.mmmmmm); NaN for anything else.
export function parseTimestamp(text) {
  const match = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?$/.exec(text ?? "");
  if (match === null) {
    return Number.NaN;
  }
  const [, year, month, day, hour, minute, second, fraction = "0"] = match;
  const millis = Number(fraction.padEnd(6, "0")) / 1000;
  return Date.UTC(+year, +month - 1, +day, +hour, +minute, +second) + millis;
}

// The wait before reconnect attempt number `attempt` (0 first): exponential
// from `base` up to `cap`, with its upper half random so that many pages cut
// off at once do not all come back at the same moment.
export function backoffDelay(attempt, random = Math.random, base = 500, cap = 30000) {
  const ceiling = Math.min(cap, base * 2 ** Math.min(attempt, 30));
  return ceiling / 2 + (random() * ceiling) / 2;
}

// When to fetch a new token and send it with TokenRefresh: after four fifths of
// the lifetime left at login, so a refresh that fails has time to be retried,
// and never sooner than a second.
export function refreshDelay(expirationMs, nowMs) {
  return Math.max(1000, (expirationMs - nowMs) * 0.8);
}

// A random (version 4) UUID for requestIds. crypto.randomUUID exists only in
// secure contexts, and the dashboard may be opened over plain HTTP on a LAN.
export function uuid4() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = [...bytes].map((byte) => byte.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}
