// A Node `ws` cluster in wsbroadcast's role, the load test's third target: node's cluster module
// forks WEB_CONCURRENCY workers sharing PORT; each worker holds its own WebSocket connections,
// subscribes to the Redis channels its clients ask for (`/ws?channels=a,b`) and forwards every
// pub/sub message as it arrived, as a text frame, to its local clients. Nothing more: no offsets,
// no acks, no limits, so that what is measured is ws and node themselves.
"use strict";

const cluster = require("node:cluster");
const http = require("node:http");
const { WebSocketServer } = require("ws");
const { createClient } = require("redis");

const PORT = Number(process.env.PORT || 8000);
const HOST = process.env.BIND_HOST || "127.0.0.1";
const WORKERS = Number(process.env.WEB_CONCURRENCY || 2);
const REDIS_URL = process.env.REDIS_URL || "redis://127.0.0.1:6379/0";

function primary() {
  let stopping = false;
  for (let i = 0; i < WORKERS; i++) cluster.fork();
  cluster.on("exit", (worker, code, signal) => {
    if (!stopping) {
      console.error(`node-ws: worker ${worker.process.pid} exited (${signal || code})`);
      stopping = true;
      stop();
    }
    if (Object.keys(cluster.workers).length === 0) process.exit(0);
  });
  function stop() {
    stopping = true;
    for (const worker of Object.values(cluster.workers)) worker.process.kill("SIGTERM");
    if (Object.keys(cluster.workers).length === 0) process.exit(0);
  }
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

async function worker() {
  const subscriber = createClient({ url: REDIS_URL });
  subscriber.on("error", (err) => console.error(`node-ws: redis: ${err.message}`));
  await subscriber.connect();

  const rooms = new Map(); // channel -> Set of sockets
  const deliver = (message, channel) => {
    const room = rooms.get(channel.toString());
    if (room === undefined) return;
    for (const socket of room) socket.send(message, { binary: false });
  };

  const server = http.createServer((req, res) => {
    res.writeHead(404, { "Content-Type": "text/plain" }).end("not found\n");
  });
  const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });
  server.on("upgrade", (req, socket, head) => {
    const url = new URL(req.url, "http://localhost");
    if (url.pathname !== "/ws") {
      socket.end("HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n");
      return;
    }
    const raw = url.searchParams.has("channels") ? url.searchParams.get("channels") : "broadcast";
    const channels = raw.split(",").filter((name) => name.length > 0);
    wss.handleUpgrade(req, socket, head, (ws) => join(ws, channels));
  });

  function join(ws, channels) {
    for (const channel of channels) {
      let room = rooms.get(channel);
      if (room === undefined) {
        room = new Set();
        rooms.set(channel, room);
        subscriber.subscribe(channel, deliver, true).catch((err) => console.error(`node-ws: subscribe: ${err.message}`));
      }
      room.add(ws);
    }
    ws.on("error", () => {});
    ws.on("close", () => {
      for (const channel of channels) {
        const room = rooms.get(channel);
        if (room === undefined) continue;
        room.delete(ws);
        if (room.size === 0) {
          rooms.delete(channel);
          subscriber.unsubscribe(channel, deliver, true).catch(() => {});
        }
      }
    });
  }

  server.listen(PORT, HOST, () => console.error(`node-ws: worker ${process.pid} listening on ${HOST}:${PORT}`));
  const stop = () => {
    for (const ws of wss.clients) ws.terminate();
    server.close();
    subscriber.quit().catch(() => {}).finally(() => process.exit(0));
  };
  process.on("SIGTERM", stop);
  process.on("disconnect", stop); // the primary is gone
}

if (cluster.isPrimary) primary();
else worker().catch((err) => { console.error(`node-ws: ${err.stack || err}`); process.exit(1); });
