"""The refusals a sidecar makes, as the shared bench's sanity checks (and
any neighbour) make it run them; bench/symbol-order.sh records them so that
their code sits with the rest of what a proxy runs.

  refusals.py serve PORT IDENTITY_DIR
      a TLS server with IDENTITY_DIR's certificate (one the outbound proxy
      must refuse: another CA's, or another identity's), until stopped
  refusals.py inbound PORT CA CLIENT_DIR ROGUE_DIR
      against an inbound proxy: a client it serves, with OpenSSL's defaults
      (SNI, AES-256-GCM); one without a certificate; one with an untrusted
      certificate; plaintext on the mTLS port
"""

import socket
import ssl
import sys

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def serve(port, identity):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(identity + "/tls.crt", identity + "/tls.key")
    with socket.create_server(("127.0.0.1", port), reuse_port=True) as server:
        while True:
            conn, _ = server.accept()
            try:
                conn.settimeout(2)
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(65536)
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass  # the proxy refused us: what it should do


def inbound(port, ca, client, rogue):
    for identity in (client, None, rogue):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(ca)
        ctx.check_hostname = False
        if identity:
            ctx.load_cert_chain(identity + "/tls.crt", identity + "/tls.key")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=3) as conn:
                with ctx.wrap_socket(conn, server_hostname="server.bench.svc") as tls:
                    tls.sendall(REQUEST)
                    while tls.recv(65536):
                        pass
        except OSError:
            pass  # refused, for the last two
    with socket.create_connection(("127.0.0.1", port), timeout=3) as conn:
        conn.sendall(REQUEST)
        try:
            conn.recv(65536)
        except OSError:
            pass


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3])
    else:
        inbound(int(sys.argv[2]), *sys.argv[3:6])
