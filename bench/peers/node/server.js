// Peer for bench/ws_fanout.py: a Node socket.io server doing the same fan-out as the gateway.
// Clients emit("subscribe", [channels], ack) and join one room per channel; an in-process
// publisher emits each event to the rooms of its channels: io.to(channel).emit("event",
// {channel, offset, data}) (socket.io encodes a broadcast once). No auth, no recovery, no filters.
// Control on stdin (`rate R` events/s, `stats`, `stop`), one JSON line per answer on stdout.
"use strict";
const fs = require("fs");
const http = require("http");
const readline = require("readline");
const { Server } = require("socket.io");

const events = fs.readFileSync(process.argv[2], "utf8").trim().split("\n").map(JSON.parse);
const httpServer = http.createServer();
const io = new Server(httpServer, { pingInterval: 20000, pingTimeout: 20000,
  perMessageDeflate: false, httpCompression: false, serveClient: false });
io.on("connection", (socket) => {
  socket.on("subscribe", (channels, ack) => {
    socket.join(channels);
    if (typeof ack === "function") ack(channels);
  });
});

const state = { rate: 0, published: 0 };
let i = 0, offset = 0, t0 = process.hrtime.bigint(), sent = 0;
setInterval(() => {
  const now = process.hrtime.bigint();
  if (state.rate <= 0) { t0 = now; sent = 0; return; }
  const due = Math.floor(state.rate * Number(now - t0) / 1e9 - sent);
  if (due <= 0) return;
  const stamp = Date.now() / 1000;
  for (let k = 0; k < due; k++) {
    const e = events[i];
    i = (i + 1) % events.length;
    offset += 1;
    const data = Object.assign({}, e.event, { emitted_at: stamp, offset });
    for (const ch of e.channels) io.to(ch).emit("event", { channel: ch, offset, data });
  }
  sent += due;
  state.published += due;
}, 10);

httpServer.listen(0, "127.0.0.1", 4096, () => {
  const port = httpServer.address().port;
  console.log(JSON.stringify({ ready: true,
    url: `ws://127.0.0.1:${port}/socket.io/?EIO=4&transport=websocket` }));
});
const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  const [cmd, arg] = line.trim().split(/\s+/);
  if (!cmd || cmd === "stop") { io.close(); process.exit(0); }
  if (cmd === "rate") state.rate = parseFloat(arg);
  console.log(JSON.stringify({ ok: cmd, published: state.published }));
});
rl.on("close", () => process.exit(0));
