"""Format bench/memory.py's JSON lines as the markdown table in README.

    .venv/bin/python bench/memory_table.py < memory.jsonl
"""

import json
import sys


def gib(n):
    return "-" if n is None else (f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB")


def main():
    rows = [json.loads(line) for line in sys.stdin if line.startswith("{")]
    print("| engine | weights | limit | result | peak cgroup | s/step | planner estimate | plan |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("completed"):
            result = "completed"
        elif r.get("oom_kills"):
            result = "OOM-killed"
        elif "does not fit" in r.get("error", ""):
            result = "refused up front"
        else:
            result = f"failed ({r.get('exit')})"
        est = r.get("estimate")
        est_txt = "-"
        if est and r.get("peak_cgroup"):
            est_txt = f"{gib(est)} ({100 * (est / r['peak_cgroup'] - 1):+.0f}%)"
        sps = f"{r['s_per_step']:.1f}" if r.get("s_per_step") else "-"
        plan = r.get("plan", "").replace("attention=sdpa, ", "").replace("kv_cache=on, ", "")
        plan = plan.replace(", kv_cache=on", "")
        print(f"| {r['engine']} | {r['weights']} | {gib(r['limit']) if r['limit'] else 'none'} | {result} "
              f"| {gib(r.get('peak_cgroup'))} | {sps} | {est_txt} | {plan} |")


if __name__ == "__main__":
    main()
