"""While testkit misbehaves (MODE: `callbacks` sleeps 2 s in 4 callbacks, `upgrades` blocks 4
upgrades for 2 s, `spin` spins forever in a callback), an echo client does a round trip every
millisecond for 7 s on the echo plugin and prints its worst. Start a host first with the echo and
testkit plugins: `wshost serve --listen 127.0.0.1:PORT --plugins DIR`; then
`python3 tests/loadgen/scripts/stall.py PORT MODE`."""
import socket, os, struct, sys, time, threading
PORT = int(sys.argv[1]); MODE = sys.argv[2]
def connect(path):
    s = socket.create_connection(("127.0.0.1", PORT))
    s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" % path).encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(4096)
        if not d: raise EOFError
        buf += d
    assert buf.startswith(b"HTTP/1.1 101"), buf[:40]
    return s, buf[buf.index(b"\r\n\r\n")+4:]
def send(s, t):
    p = t.encode(); hdr = bytes([0x81, 0x80 | len(p)]) + b"\0\0\0\0"
    s.sendall(hdr + p)
def recv_frame(s, buf):
    while True:
        if len(buf) >= 2:
            ln = buf[1] & 127; off = 2
            if ln == 126 and len(buf) >= 4: ln = struct.unpack(">H", buf[2:4])[0]; off = 4
            if len(buf) >= off + ln and not (buf[1] & 127 == 126 and len(buf) < 4):
                return buf[off:off+ln], buf[off+ln:]
        d = s.recv(65536)
        if not d: raise EOFError
        buf += d
echo, ebuf = connect("/echo")
worst = 0.0; n = 0; stop = time.time() + 7
def misbehave():
    time.sleep(0.5)
    if MODE == "callbacks":
        for i in range(4):
            t, _ = connect("/testkit"); send(t, "sleep:2000")
    elif MODE == "upgrades":
        gate = "/tmp/wshost-stall-gate"
        if os.path.exists(gate): os.remove(gate)
        for i in range(4):
            threading.Thread(target=lambda: connect("/testkit/gate?file=" + gate), daemon=True).start()
        time.sleep(2); open(gate, "w").close()
    elif MODE == "spin":
        t, _ = connect("/testkit"); send(t, "spin")
threading.Thread(target=misbehave, daemon=True).start()
while time.time() < stop:
    t0 = time.perf_counter(); send(echo, "x%d" % n); p, ebuf = recv_frame(echo, ebuf)
    dt = time.perf_counter() - t0; worst = max(worst, dt); n += 1
    time.sleep(0.001)
print("%s: %d round trips, worst %.1f ms" % (MODE, n, worst * 1000))
