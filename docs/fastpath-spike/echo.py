import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = (sys.argv[2] + " " + ",".join(f"{k}={v}" for k, v in self.headers.items() if k.lower().startswith("x-"))).encode()
        self.send_response(200); self.send_header("content-length", str(len(b))); self.end_headers(); self.wfile.write(b)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
