# Real workloads for the runc differential suite
# (tests/runc_differential.rs runs this with `python3 -c` under runc and
# under BoxLite and diffs the output). Each prints results that depend only
# on the work done, never on timing, pids or ports.
import hashlib
import http.server
import multiprocessing
import multiprocessing.shared_memory
import os
import sqlite3
import sys
import threading
import urllib.request

MIB = 1024 * 1024


def out(key, value):
    print(f"{key}={value}", flush=True)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = hashlib.sha256(self.path.encode()).hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        data = self.rfile.read(int(self.headers["Content-Length"]))
        body = hashlib.sha256(data).hexdigest().encode()
        self.send_response(201)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        # The default log has a timestamp and the client's port.
        pass


def http_localhost():
    for host in ("127.0.0.1", "::1"):
        cls = http.server.ThreadingHTTPServer
        if ":" in host:
            cls = type("V6", (cls,), {"address_family": __import__("socket").AF_INET6})
        server = cls((host, 0), Handler)
        port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        for path in ("/", "/a/b?c=d"):
            with urllib.request.urlopen(url + path, timeout=60) as r:
                out(f"http.{host}.get.{path}", f"{r.status} {r.read().decode()}")
        payload = bytes(range(256)) * 4096
        req = urllib.request.Request(url + "/upload", data=payload, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            out(f"http.{host}.post", f"{r.status} {r.read().decode()}")
        server.shutdown()
        server.server_close()


def square(n):
    return n * n


def add_under_lock(lock, counter, times):
    for _ in range(times):
        with lock:
            counter.value += 1


def shm_child(name, size):
    shm = multiprocessing.shared_memory.SharedMemory(name=name)
    digest = hashlib.sha256(bytes(shm.buf[:size])).hexdigest()
    shm.buf[0] = 0xFF
    shm.close()
    return digest


def multiprocessing_shm():
    # Pool (fork), Lock and Value (POSIX semaphores and shared memory,
    # both in /dev/shm), a named SharedMemory block read by a child.
    with multiprocessing.Pool(4) as pool:
        out("mp.pool.sum_of_squares", sum(pool.map(square, range(1000))))
    lock = multiprocessing.Lock()
    counter = multiprocessing.Value("i", 0, lock=False)
    workers = [multiprocessing.Process(target=add_under_lock, args=(lock, counter, 200))
               for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out("mp.lock.counter", counter.value)
    out("mp.lock.exitcodes", [w.exitcode for w in workers])
    sem = multiprocessing.BoundedSemaphore(2)
    out("mp.semaphore.acquire", [sem.acquire(timeout=5) for _ in range(3)])
    size = 4 * MIB
    shm = multiprocessing.shared_memory.SharedMemory(create=True, size=size)
    shm.buf[:size] = bytes(range(256)) * (size // 256)
    out("mp.shm.in_dev_shm", os.path.exists("/dev/shm/" + shm.name.lstrip("/")))
    with multiprocessing.Pool(1) as pool:
        out("mp.shm.child_digest", pool.apply(shm_child, (shm.name, size)))
    out("mp.shm.parent_digest", hashlib.sha256(bytes(shm.buf[:size])).hexdigest())
    shm.close()
    shm.unlink()
    out("mp.shm.left", sorted(os.listdir("/dev/shm")))


def sqlite():
    path = "/tmp/difftest.db"
    db = sqlite3.connect(path)
    out("sqlite.journal_mode", db.execute("PRAGMA journal_mode=WAL").fetchone()[0])
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, value REAL)")
    with db:
        db.executemany("INSERT INTO t (name, value) VALUES (?, ?)",
                       ((f"row{i}", i * 0.5) for i in range(5000)))
    db.execute("CREATE INDEX t_name ON t (name)")
    out("sqlite.count_sum", db.execute("SELECT count(*), sum(value) FROM t").fetchone())
    out("sqlite.lookup", db.execute("SELECT id FROM t WHERE name = 'row4321'").fetchone())
    out("sqlite.integrity", db.execute("PRAGMA integrity_check").fetchone()[0])
    db.close()
    # A second connection sees the committed data after the WAL checkpoint.
    db = sqlite3.connect(path)
    out("sqlite.reopen_count", db.execute("SELECT count(*) FROM t").fetchone()[0])
    db.close()


def large_write(directory, mib):
    path = os.path.join(directory, "large.bin")
    block = hashlib.sha256(directory.encode()).digest() * (MIB // 32)
    written = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(mib):
            chunk = bytes([i % 256]) + block[1:]
            f.write(chunk)
            written.update(chunk)
        f.flush()
        os.fsync(f.fileno())
    read = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            read.update(chunk)
    out(f"write.{directory}.size", os.path.getsize(path))
    out(f"write.{directory}.digest_matches", written.hexdigest() == read.hexdigest())
    out(f"write.{directory}.digest", read.hexdigest())


def threads():
    results = []
    lock = threading.Lock()

    def work(n):
        h = hashlib.sha256(str(n).encode())
        for _ in range(2000):
            h = hashlib.sha256(h.digest())
        with lock:
            results.append((n, h.hexdigest()[:16]))

    pool = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out("threads.count", len(results))
    out("threads.results", sorted(results))
    out("threads.active_after_join", threading.active_count())


WORKLOADS = {"http": http_localhost, "multiprocessing": multiprocessing_shm,
             "sqlite": sqlite, "threads": threads}

for arg in sys.argv[1:]:
    if arg.startswith("write:"):
        _, directory, mib = arg.split(":")
        large_write(directory, int(mib))
    else:
        WORKLOADS[arg]()
