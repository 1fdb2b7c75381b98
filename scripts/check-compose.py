#!/usr/bin/env python3
"""Checks docker-compose.yml without a Docker engine: it parses, its
services are the ones the README describes, the app instances run the
demo's worker against the compose Redis, and their flags are ones the
`lockstep worker` command accepts (read from `lockstep worker --help`)."""
import re
import subprocess
import sys

try:
    import yaml
except ImportError:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "--user", "pyyaml"])
    import site, importlib
    sys.path.append(site.getusersitepackages())
    yaml = importlib.import_module("yaml")

lockstep = sys.argv[1] if len(sys.argv) > 1 else "target/debug/lockstep"
compose = yaml.safe_load(open("docker-compose.yml"))
readme = open("README.md").read()
dockerfile = open("Dockerfile").read()
problems = []

services = compose.get("services", {})
apps = [s for s in services if s.startswith("app")]
if set(services) != {"redis", "app1", "app2", "app3", "report"}:
    problems.append(f"services are {sorted(services)}, expected redis, app1-app3, report")

worker_help = subprocess.run([lockstep, "worker", "--help"], capture_output=True, text=True).stdout
report_help = subprocess.run([lockstep, "report", "--help"], capture_output=True, text=True).stdout
for name in apps + ["report"]:
    svc = services[name]
    if svc.get("build") != ".":
        problems.append(f"{name} is not built from the Dockerfile")
    if svc.get("environment", {}).get("LOCKING_REDIS_URL") != "redis://redis:6379":
        problems.append(f"{name} does not point at the compose Redis")
    cmd = svc.get("command", [])
    help_text = report_help if name == "report" else worker_help
    if name != "report" and cmd[:1] != ["worker"]:
        problems.append(f"{name} does not run the demo's worker: {cmd}")
    for flag in [c for c in cmd if c.startswith("--")]:
        if flag not in help_text:
            problems.append(f"{name} passes {flag}, which `lockstep {cmd[0]}` does not accept")
instances = sorted(int(services[a]["command"][services[a]["command"].index("--instance") + 1]) for a in apps)
if instances != [0, 1, 2]:
    problems.append(f"the apps' --instance values are {instances}, expected 0, 1, 2")

if "-p lockstep-cli" not in dockerfile:
    problems.append("the Dockerfile does not build the lockstep-cli package")
for needed in ["cli", "testkit", "src", "lua"]:
    if f"COPY {needed} {needed}" not in dockerfile:
        problems.append(f"the Dockerfile does not copy {needed}/, which the build needs")
for needle in ["docker compose up --build", "docker-compose.yml"] + sorted(services):
    if needle not in readme:
        problems.append(f"the README does not mention {needle!r}")
if not re.search(r"docker compose up --build[^\n]*", readme):
    problems.append("the README lacks the compose command")

if problems:
    print("docker-compose.yml check failed:")
    for p in problems:
        print(" -", p)
    sys.exit(1)
print(f"docker-compose.yml: {len(services)} services, consistent with the README and `lockstep worker`")
