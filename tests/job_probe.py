"""A job for the local-job tests: `python -m tests.job_probe [--exit N] [--sleep S] [--spawn] [--mark FILE]
[--show-env NAME]...`."""

import argparse
import os
import subprocess
import sys
import time

WARM = "torch" in sys.modules  # imported before this module ran: the job was forked from a warm server

parser = argparse.ArgumentParser()
parser.add_argument("--exit", type=int, default=0)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--spawn", action="store_true", help="start a grandchild in its own process group")
parser.add_argument("--fds", action="store_true", help="print how many sockets the job holds open")
parser.add_argument("--mark", help="append this process's pid to the file (counts the copies that started)")
parser.add_argument("--show-env", action="append", default=[], metavar="NAME",
                    help="print each variable's value, and whether /proc/self/environ holds it at all")
parser.add_argument("words", nargs="*", help="echoed back, to check the arguments arrive intact")
args = parser.parse_args()
if args.mark:
    with open(args.mark, "a") as mark:
        mark.write(f"{os.getpid()}\n")
for name in args.show_env:
    with open("/proc/self/environ", "rb") as block:
        in_block = any(item.split(b"=", 1)[0] == name.encode() for item in block.read().split(b"\0"))
    print(f"env {name}={os.environ.get(name, '<unset>')} in_proc_environ={in_block}")
print(f"probe warm={WARM} cwd={os.getcwd()} probe_env={os.environ.get('PROBE_VALUE')} argv={sys.argv[1:]}")
if args.fds:
    fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
           if os.path.exists(f"/proc/self/fd/{fd}") or os.path.islink(f"/proc/self/fd/{fd}")]
    print(f"sockets={sum(target.startswith('socket:') for target in fds)}")
print("probe stderr line", file=sys.stderr)
if args.spawn:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], process_group=0)
    print("child", child.pid)
time.sleep(args.sleep)
sys.exit(args.exit)
