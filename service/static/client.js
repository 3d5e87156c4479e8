// wsbroadcast browser client: an ES module with no dependencies, served as GET /client.js.
//
//   import { WsBroadcast } from "/client.js";
//   const client = new WsBroadcast("wss://host/ws", { token });
//   const sub = client.subscribe("news", (data, publication) => { ... });
//   client.on("state", (state) => { ... });        // "connecting", "connected", "disconnected"
//   client.on("gap", (channel, info) => { ... });  // publications were lost: reload that state
//   sub.unsubscribe(); client.close();
//
// It reconnects with full-jitter exponential backoff, resubscribes every channel with its last
// {offset, epoch} so the server sends what was missed, drops duplicates by offset, and pings to
// find a connection that died without a close.

const CHANNEL_RE = /^[A-Za-z0-9_.:-]{1,128}$/;
// Close codes after which reconnecting at once would be refused the same way again.
const POLICY = 1008;
const TOKEN_EXPIRED = 3000;
const NORMAL = 1000;

const DEFAULTS = {
  token: null, // a string, or a function returning a string or a promise of one (called per connect)
  minDelay: 500, // ms, first reconnect delay bound
  maxDelay: 20000, // ms, largest reconnect delay bound
  policyDelay: 60000, // ms, delay after a 1008 policy close or an expired token without a token function
  stableAfter: 5000, // ms a connection must last for the backoff to start again from minDelay
  pingInterval: 15000, // ms between pings
  pongTimeout: 10000, // ms to wait for a pong before the connection counts as dead
  WebSocket: typeof WebSocket === "undefined" ? null : WebSocket,
};

export class WsBroadcast {
  constructor(url, options = {}) {
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    this.state = "disconnected";
    this.retryIn = 0;
    this._channels = new Map(); // channel -> {handlers: Set, offset, epoch}
    this._listeners = new Map(); // event -> Set of callbacks
    this._ws = null;
    this._attempt = 0;
    this._timer = null;
    this._pingTimer = null;
    this._pongTimer = null;
    this._openedAt = 0;
    this._closed = false;
    this._connect();
  }

  // Subscribe at any time; handler(data, publication) gets each publication of the channel once.
  subscribe(channel, handler) {
    if (!CHANNEL_RE.test(channel)) throw new Error(`invalid channel name ${JSON.stringify(channel)}`);
    let entry = this._channels.get(channel);
    if (!entry) {
      entry = { handlers: new Set(), offset: null, epoch: null };
      this._channels.set(channel, entry);
      if (this.state === "connected") this._send({ op: "subscribe", channel });
    }
    const own = { handler }; // a wrapper: the same function may be subscribed twice
    entry.handlers.add(own);
    return {
      unsubscribe: () => {
        if (!entry.handlers.delete(own) || entry.handlers.size > 0) return;
        if (this._channels.get(channel) === entry) this._channels.delete(channel);
        if (this.state === "connected") this._send({ op: "unsubscribe", channel });
      },
    };
  }

  // Events: "state" (state), "gap" (channel, {offset, epoch, reason}), "subscribed" (channel, ack),
  // "error" ({error, detail} from the server, or {code, reason} of a refusing close).
  on(event, callback) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(callback);
    return () => this._listeners.get(event).delete(callback);
  }

  // A fresh connect token before the current one expires (also used for later reconnects).
  refresh(token) {
    this.options.token = token;
    if (this.state === "connected") this._send({ op: "refresh", token });
  }

  close() {
    this._closed = true;
    clearTimeout(this._timer);
    this._stopPings();
    if (this._ws) this._ws.close(NORMAL, "client closed");
    this._setState("disconnected");
  }

  _emit(event, ...args) {
    for (const callback of this._listeners.get(event) || []) {
      try {
        callback(...args);
      } catch (err) {
        setTimeout(() => { throw err; }); // an app's bug must not break the client
      }
    }
  }

  _setState(state) {
    if (state === this.state) return;
    this.state = state;
    this._emit("state", state);
  }

  async _connect() {
    if (this._closed) return;
    this._setState("connecting");
    let token = this.options.token;
    if (typeof token === "function") {
      try {
        token = await token();
      } catch (err) {
        this._emit("error", { error: "token_callback_failed", detail: String(err) });
        this._retry(this._delay());
        return;
      }
      if (this._closed) return;
    }
    const url = new URL(this.url, typeof location === "undefined" ? undefined : location.href);
    url.protocol = url.protocol.replace(/^http/, "ws");
    url.searchParams.set("channels", ""); // subscribe with ops, so each one can carry "since"
    if (token) url.searchParams.set("token", token);
    const ws = new this.options.WebSocket(url.toString());
    this._ws = ws;
    ws.onopen = () => this._opened(ws);
    ws.onmessage = (event) => this._message(event.data);
    ws.onclose = (event) => this._lost(ws, event.code, event.reason);
  }

  _opened(ws) {
    if (ws !== this._ws) return;
    this._openedAt = Date.now();
    // Every channel in one go, each from where it stopped; one that a "connected" listener adds
    // is sent by subscribe() itself.
    const channels = [...this._channels];
    this._setState("connected");
    for (const [channel, entry] of channels) {
      const op = { op: "subscribe", channel };
      if (entry.offset !== null && entry.epoch !== null) op.since = { offset: entry.offset, epoch: entry.epoch };
      this._send(op);
    }
    this._startPings();
  }

  _message(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch (err) {
      return; // not ours to handle: the server only sends JSON
    }
    if (frame.op === undefined) this._publication(frame);
    else if (frame.op === "pong") this._pong();
    else if (frame.op === "subscribed") this._subscribed(frame);
    else if (frame.op === "gap") this._gap(frame.channel, frame, "gap");
    else if (frame.op === "error") this._emit("error", { error: frame.error, detail: frame.detail });
    else if (frame.op === "refreshed") this._emit("refreshed", frame);
  }

  _publication(frame) {
    const entry = this._channels.get(frame.channel);
    if (!entry) return; // unsubscribed meanwhile
    if (typeof frame.offset === "number") {
      if (frame.epoch === entry.epoch && entry.offset !== null && frame.offset <= entry.offset) return; // duplicate
      entry.offset = frame.offset;
      entry.epoch = frame.epoch;
    }
    for (const own of [...entry.handlers]) {
      try {
        own.handler(frame.data, frame);
      } catch (err) {
        setTimeout(() => { throw err; });
      }
    }
  }

  _advance(entry, frame) {
    if (typeof frame.offset !== "number") return;
    if (frame.epoch !== entry.epoch || entry.offset === null || frame.offset > entry.offset) {
      entry.offset = frame.offset;
      entry.epoch = frame.epoch;
    }
  }

  _subscribed(frame) {
    const entry = this._channels.get(frame.channel);
    if (!entry) return;
    this._advance(entry, frame);
    if (frame.recovered === false) this._gap(frame.channel, frame, "not_recovered");
    this._emit("subscribed", frame.channel, frame);
  }

  _gap(channel, frame, reason) {
    const entry = this._channels.get(channel);
    if (!entry) return;
    this._advance(entry, frame);
    this._emit("gap", channel, { offset: frame.offset, epoch: frame.epoch, reason });
  }

  _lost(ws, code, reason) {
    if (ws !== this._ws) return;
    this._ws = null;
    this._stopPings();
    const lasted = this._openedAt ? Date.now() - this._openedAt : 0;
    this._openedAt = 0;
    if (lasted >= this.options.stableAfter) this._attempt = 0;
    this._setState("disconnected");
    if (this._closed) return;
    if (code === POLICY || code === TOKEN_EXPIRED) {
      this._emit("error", { code, reason });
      // A fresh token from the app's function may well be accepted; anything else would be
      // refused again, so wait long instead of hammering the server.
      const renewable = code === TOKEN_EXPIRED && typeof this.options.token === "function";
      this._retry(renewable ? this._delay() : this.options.policyDelay * (0.5 + Math.random() / 2));
      return;
    }
    // 1012 restarting, 1013 full, 4008 slow, 4000 idle, 1006 abnormal (a refused handshake too).
    this._retry(this._delay());
  }

  _delay() {
    const bound = Math.min(this.options.maxDelay, this.options.minDelay * 2 ** this._attempt);
    this._attempt = Math.min(this._attempt + 1, 30);
    return Math.random() * bound; // full jitter: a crowd of clients spreads out
  }

  _retry(delay) {
    this.retryIn = delay; // ms until the next connect attempt
    clearTimeout(this._timer);
    this._timer = setTimeout(() => this._connect(), delay);
  }

  _startPings() {
    this._stopPings();
    this._pingTimer = setInterval(() => {
      if (this._pongTimer !== null) return; // still waiting for the last pong: its deadline holds
      this._send({ op: "ping" });
      this._pongTimer = setTimeout(() => this._dead(), this.options.pongTimeout);
    }, this.options.pingInterval);
  }

  _pong() {
    clearTimeout(this._pongTimer);
    this._pongTimer = null;
  }

  _stopPings() {
    clearInterval(this._pingTimer);
    this._pong();
  }

  _dead() {
    // No pong: the connection is gone without a close frame (a sleeping laptop, a dropped route).
    // close() of a dead socket can take long to fire onclose: act now, ignore it later.
    const ws = this._ws;
    if (!ws) return;
    ws.close(4001, "no pong");
    this._lost(ws, 1006, "no pong");
  }

  _send(frame) {
    if (this._ws && this._ws.readyState === 1) this._ws.send(JSON.stringify(frame));
  }
}
