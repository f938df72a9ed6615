// The dashboard page: sign-in, reference data, and one panel per watched
// product, all fed by one Stream.

import { Session, streamUrl } from "./api.js";
import { Book } from "./book.js";
import { drawDepth } from "./depth.js";
import { Stream } from "./stream.js";

const $ = (selector, root = document) => root.querySelector(selector);

const state = { session: null, stream: null, panels: new Set(), products: new Map(), lastReconnect: null };

function text(value) {
  return value === undefined || value === null ? "–" : String(value);
}

function clock(timestamp) {
  return timestamp ? `${timestamp.slice(11, 23)} GMT` : "–";
}

// One watched product: its Level1 and Level2 subscriptions, their statuses,
// the ladder and the depth chart.
class Panel {
  constructor(product, levels, conflation) {
    this.book = new Book();
    this.level1 = {};
    this.messages = 0;
    this.rateStart = performance.now();
    this.rateTimer = setInterval(() => this.#rate(), 2000);
    this.frame = 0;
    this.element = $("#panel-template").content.firstElementChild.cloneNode(true);
    this.element.dataset.symbol = product.caspianCode;
    this.element.dataset.whole = "false";
    $(".symbol", this.element).textContent = product.caspianCode;
    $(".description", this.element).textContent = `${text(product.description)} · ${levels} levels · ${conflation}`;
    $(".close", this.element).addEventListener("click", () => this.close());
    $("#panels").append(this.element);

    this.problems = new Map();
    const base = { symbol: product.caspianCode, conflation };
    this.subscriptions = [
      state.stream.subscribe(
        { ...base, type: "Level1" },
        {
          onRestart: () => {
            this.level1 = {};
          },
          onResponse: (code, message) => this.#response("Level1", code, message),
          onData: (message) => {
            this.messages += 1;
            this.level1 = message;
            this.#changed();
          },
        },
      ),
      state.stream.subscribe(
        { ...base, type: "Level2", numberOfLevels: levels },
        {
          // A new subscription (first, or after a reconnect) starts from its
          // next whole top-N: the old book is dropped, not patched.
          onRestart: () => {
            this.book.restart();
            this.#changed();
          },
          onResponse: (code, message) => this.#response("Level2", code, message),
          onData: (message) => {
            this.messages += 1;
            if (this.book.apply(message)) {
              this.#changed();
            }
          },
        },
      ),
    ];
  }

  #response(kind, code, message) {
    if (code === 200) {
      this.problems.delete(kind);
    } else {
      this.problems.set(kind, `${kind}: ${code} ${text(message)}`);
      // Refused or ended (205 when an entitlement is revoked): nothing more will
      // come, so what was shown must not stay up as if it were live.
      if (kind === "Level1") {
        this.level1 = {};
      } else {
        this.book.restart();
      }
      this.#changed();
    }
    $(".problem", this.element).textContent = [...this.problems.values()].join(" · ");
  }

  // Messages a second since the last reading.
  #rate() {
    const now = performance.now();
    const rate = (this.messages * 1000) / (now - this.rateStart);
    this.messages = 0;
    this.rateStart = now;
    $(".rate", this.element).textContent = `${rate.toFixed(1)} msg/s`;
  }

  // Drawing waits for the next frame, so a burst of messages costs one render.
  #changed() {
    if (this.frame === 0) {
      this.frame = requestAnimationFrame(() => {
        this.frame = 0;
        this.render();
      });
    }
  }

  render() {
    const element = this.element;
    const level1 = this.level1;
    const quote = level1.payload ?? {};
    for (const [name, status] of [
      ["bbo", level1.bboStream],
      ["trade", level1.tradeStream],
      ["depth", this.book.depthStream],
    ]) {
      const badge = $(`.stream.${name}`, element);
      badge.dataset.status = status ?? "unknown";
      badge.title = `${name} stream: ${status ?? "not yet known"}`;
    }
    $(".bid", element).textContent = quote.bid === undefined ? "–" : `${quote.bid} × ${text(quote.bidSize)}`;
    $(".ask", element).textContent = quote.ask === undefined ? "–" : `${quote.ask} × ${text(quote.askSize)}`;
    $(".spread", element).textContent =
      quote.bid === undefined || quote.ask === undefined ? "–" : String(+(quote.ask - quote.bid).toPrecision(8));
    $(".trade-price", element).textContent =
      quote.tradePrice === undefined ? "–" : `${quote.tradePrice} × ${text(quote.tradeSize)}`;
    $(".updated", element).textContent = clock(quote.bboCaspianTimestamp);

    const bids = this.book.whole ? this.book.sortedBids() : [];
    const asks = this.book.whole ? this.book.sortedAsks() : [];
    element.dataset.whole = String(this.book.whole);
    element.dataset.caspianTimestamp = this.book.caspianTimestamp ?? "";
    element.dataset.depthStream = this.book.depthStream ?? "";
    this.#ladder(bids, asks);
    drawDepth($(".depth-chart", element), bids, asks);
  }

  #ladder(bids, asks) {
    const largest = Math.max(0, ...bids.map(([, size]) => size), ...asks.map(([, size]) => size));
    const row = (side, price, size, best) => {
      const tr = document.createElement("tr");
      tr.className = best ? `${side} best` : side;
      tr.dataset.side = side;
      tr.dataset.price = String(price);
      tr.dataset.size = String(size);
      for (const column of ["bid", "price", "ask"]) {
        const td = document.createElement("td");
        if (column === "price") {
          td.className = "price";
          td.textContent = String(price);
        } else {
          td.className = `size ${column}-size`;
          if (column === side) {
            const bar = document.createElement("span");
            bar.className = "bar";
            bar.style.width = `${(size / largest) * 100}%`;
            const value = document.createElement("span");
            value.className = "value";
            value.textContent = String(size);
            td.append(bar, value);
          }
        }
        tr.append(td);
      }
      return tr;
    };
    // Asks above bids, the best of each at the spread in the middle.
    const rows = [
      ...[...asks].reverse().map(([price, size]) => row("ask", price, size, false)),
      ...bids.map(([price, size], index) => row("bid", price, size, index === 0)),
    ];
    $(".ladder tbody", this.element).replaceChildren(...rows);
  }

  close() {
    for (const subscription of this.subscriptions) {
      subscription.close();
    }
    cancelAnimationFrame(this.frame);
    clearInterval(this.rateTimer);
    this.element.remove();
    state.panels.delete(this);
  }
}

function setStatus(detail) {
  const status = $("#status");
  status.dataset.state = detail.state;
  const connection = $("#connection");
  if (detail.state === "open") {
    connection.textContent = "stream open";
  } else if (detail.state === "connecting") {
    connection.textContent = detail.attempt ? `connecting (attempt ${detail.attempt + 1})…` : "connecting…";
  } else if (detail.state === "waiting") {
    const why = detail.code ? `closed ${detail.code}${detail.reason ? ` ${detail.reason}` : ""}` : "closed";
    connection.textContent = `${why}; reconnecting in ${(detail.delay / 1000).toFixed(1)} s`;
  } else {
    connection.textContent = "signed out";
  }
  if (detail.reconnects !== undefined) {
    if (detail.state === "open" && detail.reconnects > 0) {
      state.lastReconnect = new Date().toLocaleTimeString();
    }
    status.dataset.reconnects = String(detail.reconnects);
    const last = state.lastReconnect ? `, last at ${state.lastReconnect}` : "";
    $("#reconnects").textContent = `reconnects: ${detail.reconnects}${last}`;
  }
}

function showToken(note) {
  const session = state.session;
  const until = session?.expiration ? `${session.expiration.slice(0, 10)} ${session.expiration.slice(11, 19)} GMT` : "–";
  $("#token").textContent = session ? `token until ${until}${note ? ` · ${note}` : ""}` : "";
}

async function loadExchanges() {
  const select = $("#exchange");
  const exchanges = await state.session.exchanges();
  select.replaceChildren(
    ...exchanges.map(({ name, code }) => new Option(`${name} (${code})`, code)),
  );
  await loadProducts();
}

async function loadProducts() {
  const code = $("#exchange").value;
  const select = $("#product");
  select.replaceChildren();
  state.products.clear();
  if (!code) {
    return;
  }
  const products = await state.session.products([code]);
  products.sort((a, b) => a.caspianCode.localeCompare(b.caspianCode));
  for (const product of products) {
    state.products.set(product.caspianCode, product);
  }
  select.replaceChildren(
    ...products.map((product) => new Option(`${product.caspianCode} — ${text(product.description)}`, product.caspianCode)),
  );
}

function reportTo(selector) {
  return (error) => {
    $(selector).textContent = error.message;
  };
}

function signedIn(session) {
  state.session = session;
  const stream = new Stream(session, streamUrl());
  state.stream = stream;
  stream.addEventListener("state", (event) => setStatus(event.detail));
  stream.addEventListener("refresh", (event) => {
    const { code, message, refreshes } = event.detail;
    if (code === 200) {
      $("#status").dataset.refreshes = String(refreshes);
      showToken(`refreshed ${refreshes}×`);
    } else {
      showToken(`refresh failed: ${text(code)} ${text(message)}`);
    }
  });
  stream.addEventListener("protocol-error", (event) => {
    const { code, message } = event.detail;
    $("#add-error").textContent = code === null ? message : `ProtocolError ${code} ${text(message)}`;
  });
  stream.addEventListener("signed-out", (event) => signOut(event.detail.message));
  $("#sign-in").hidden = true;
  $("#board").hidden = false;
  $("#sign-out").hidden = false;
  showToken();
  stream.start();
  loadExchanges().catch(reportTo("#add-error"));
}

function signOut(message) {
  for (const panel of [...state.panels]) {
    panel.close();
  }
  state.stream?.stop();
  state.session?.forget();
  state.stream = null;
  state.session = null;
  $("#key-form").elements.secret.value = "";
  $("#user-form").elements.password.value = "";
  $("#sign-in-error").textContent = message ?? "";
  $("#sign-in").hidden = false;
  $("#board").hidden = true;
  $("#sign-out").hidden = true;
  state.lastReconnect = null;
  setStatus({ state: "signed-out", reconnects: 0 });
  $("#reconnects").textContent = "";
  showToken();
}

function main() {
  const keyForm = $("#key-form");
  const userForm = $("#user-form");
  for (const radio of document.querySelectorAll("input[name=kind]")) {
    radio.addEventListener("change", () => {
      const key = $("input[name=kind]:checked").value === "Key";
      keyForm.hidden = !key;
      userForm.hidden = key;
    });
  }
  const signIn = async (credentials) => {
    $("#sign-in-error").textContent = "";
    const session = new Session(credentials);
    try {
      await session.login();
    } catch (error) {
      $("#sign-in-error").textContent = `Sign-in failed: ${error.message}`;
      return;
    }
    signedIn(session);
  };
  keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const fields = keyForm.elements;
    signIn({ type: "Key", keyId: fields.keyId.value.trim(), secret: fields.secret.value });
  });
  userForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const fields = userForm.elements;
    signIn({ type: "Credential", user: fields.user.value.trim(), password: fields.password.value });
  });
  $("#sign-out").addEventListener("click", () => signOut());
  $("#exchange").addEventListener("change", () => {
    $("#add-error").textContent = "";
    loadProducts().catch(reportTo("#add-error"));
  });
  $("#add-form").addEventListener("submit", (event) => {
    event.preventDefault();
    $("#add-error").textContent = "";
    const product = state.products.get($("#product").value);
    const levels = Number($("#levels").value);
    if (product === undefined) {
      $("#add-error").textContent = "Pick a product first.";
      return;
    }
    if (!Number.isInteger(levels) || levels < 1 || levels > 100) {
      $("#add-error").textContent = "Levels must be a whole number from 1 to 100.";
      return;
    }
    state.panels.add(new Panel(product, levels, $("#conflation").value));
  });
}

main();
