"""Connection setup: N sequential connect + upgrade + one echo on /echo; prints the median and
p90. `python3 tests/loadgen/scripts/connect.py PORT N`."""
import socket, sys, time
port=int(sys.argv[1]); n=int(sys.argv[2]); ts=[]
for i in range(n):
    t0=time.perf_counter()
    s=socket.create_connection(("127.0.0.1",port))
    s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    buf=b""
    while b"\r\n\r\n" not in buf: buf+=s.recv(4096)
    s.sendall(bytes([0x81,0x82,0,0,0,0])+b"hi")
    while len(buf) < buf.index(b"\r\n\r\n")+4+4: buf+=s.recv(4096)
    ts.append(time.perf_counter()-t0); s.close()
ts.sort(); print("median %.0f us, p90 %.0f us" % (ts[len(ts)//2]*1e6, ts[int(len(ts)*0.9)]*1e6))
