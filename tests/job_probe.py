"""A job for the local-job tests: `python -m tests.job_probe [--exit N] [--sleep S] [--spawn]`."""

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
parser.add_argument("words", nargs="*", help="echoed back, to check the arguments arrive intact")
args = parser.parse_args()
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
