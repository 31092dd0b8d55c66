// A socket.io-client driven by tests/gateway/test_socketio.py.
// Usage: node client.mjs URL API_KEY SUBSCRIPTIONS_JSON
// Connects with auth {apiKey}, emits one `subscribe` per item of SUBSCRIPTIONS_JSON (an array of
// payloads; an item {"unsubscribe": payload} emits `unsubscribe`), and prints one JSON line per
// thing that happens: {"event": name, "data": ...}. Stdin closing ends the process.
import { io } from "socket.io-client";

const [url, apiKey, subs] = process.argv.slice(2);
const print = (event, data) => process.stdout.write(JSON.stringify({ event, data }) + "\n");
const socket = io(url, { auth: { apiKey }, transports: ["websocket"], reconnection: false });

socket.on("connect", () => {
  print("connect", null);
  for (const item of JSON.parse(subs)) {
    if (item && item.unsubscribe) socket.emit("unsubscribe", item.unsubscribe);
    else socket.emit("subscribe", item);
  }
});
socket.on("connect_error", (err) => {
  print("connect_error", { message: err.message, data: err.data ?? null });
  process.exit(0);
});
socket.on("disconnect", (reason) => print("disconnect", reason));
socket.onAny((event, data) => print(event, data));
process.stdin.on("end", () => { socket.close(); process.exit(0); });
process.stdin.resume();
