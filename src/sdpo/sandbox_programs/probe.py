
import json, os, socket, time
forks = []
for _ in range(12):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(10)
        os._exit(0)
    forks.append(pid)
for pid in forks:
    os.kill(pid, 9)
try:
    blob = bytearray(512 << 20)
    memory_limited = False
except MemoryError:
    memory_limited = True
try:
    interfaces = sorted(name for _, name in socket.if_nameindex())
except OSError:
    interfaces = None
with open("/proc/self/status") as f:
    nnp = "NoNewPrivs:\t1" in f.read()
print(json.dumps({"forks": len(forks), "memory_limited": memory_limited, "interfaces": interfaces,
                  "uid": os.getuid(), "no_new_privs": nnp,
                  "host_file_visible": any(os.path.exists(p) for p in HOST_FILES)}))
