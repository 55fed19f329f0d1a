"""The simulator against repeated live runs: every (live report, profile) pair re-simulated.

    python -m tokenpool.bench.sim_validation --report R1.json --report R2.json ... \
        --profile P1.json --profile P2.json ... [--nearest 2] --json OUT.json

One live run of a trace is one sample of this machine (its speed drifts by 15-25% within
an hour, and a point whose median TTFT sits at the SLO swings by tens of points between
runs of the same trace); one profile is one sample too, of the machine as it was then. So
for every policy and load this collects each live attainment over the reports, and each
simulated one (`tokenpool bench serve --resimulate`, the same traces) over the profiles,
or with --nearest N over the N profiles measured nearest each live run in time (measure
them interleaved: profile, live run, profile, ...), and reports both ranges, their means,
the gap between the means, and the mean median TTFTs. Prints a table; writes JSON (all or
nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenpool.bench.sim_validation",
                                description=__doc__.split("\n")[0])
    p.add_argument("--report", action="append", type=Path, required=True, help="a `bench serve` report")
    p.add_argument("--profile", action="append", type=Path, required=True, help="a `tokenpool profile` file")
    p.add_argument("--nearest", type=int, default=0, metavar="N",
                   help="re-simulate each report with only the N profiles measured nearest to it in time "
                        "(by the files' dates; the machine's speed drifts, so a profile measured hours "
                        "away describes another machine; default: every profile)")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    if args.nearest < 0:
        p.error(f"--nearest {args.nearest}: expected 0 (every profile) or more")
    paired = pair_by_time(args.report, args.profile, args.nearest)
    command = " ".join(["python -m tokenpool.bench.sim_validation",
                        *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    from tokenpool.cli.main import main as cli_main  # one process: imports and interpreter start once

    live, simulated = defaultdict(list), defaultdict(list)  # (policy, load) -> [(attainment, TTFT p50)]
    with tempfile.TemporaryDirectory(prefix="tokenpool-simval-") as scratch:
        for report, profiles in paired.items():
            for profile in profiles:
                out = Path(scratch) / "out.json"
                print(f"re-simulating {report} with {profile}", file=sys.stderr, flush=True)
                with contextlib.redirect_stdout(io.StringIO()):  # its own table; ours comes at the end
                    code = cli_main(["bench", "serve", "--resimulate", str(report),
                                     "--sim-profile", str(profile), "--json", str(out)])
                if code != 0:
                    raise SystemExit(f"re-simulating {report} with {profile} failed (exit {code}); see above")
                for policy, result in json.loads(out.read_text())["policies"].items():
                    for point, sim in zip(result["points"], result["simulated"]["points"], strict=True):
                        simulated[policy, point["load"]].append((sim["attainment"], sim["ttft_p50"]))
                        if profile == profiles[0]:
                            live[policy, point["load"]].append((point["attainment"], point["ttft_p50"]))
    rows = [_row(policy, load, live[policy, load], simulated[policy, load]) for policy, load in sorted(live)]
    print_table(rows)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps({"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                               "reports": [str(r) for r in args.report],
                               "profiles": [str(p) for p in args.profile],
                               "paired": {str(r): [str(p) for p in ps] for r, ps in paired.items()},
                               "rows": rows}, indent=1))
    tmp.replace(args.json)
    print(f"wrote {args.json}")
    return 0


def pair_by_time(reports: list[Path], profiles: list[Path], nearest: int) -> dict[Path, list[Path]]:
    """Each report -> the profiles to re-simulate it with: all of them, or the `nearest` ones by
    the distance from the profile's date to the live run's middle (its start and end dates;
    a report without an end is taken at its start). Ties go to the earlier profile."""
    if not nearest:
        return {report: list(profiles) for report in reports}
    if nearest > len(profiles):
        raise SystemExit(f"--nearest {nearest}: only {len(profiles)} profiles given")
    middle = {}
    for report in reports:
        data = _read(report)
        start = _date(report, data, "date")
        middle[report] = (start + _date(report, data, "ended")) / 2 if "ended" in data else start
    when = {profile: _date(profile, _read(profile), "date") for profile in profiles}
    return {report: sorted(sorted(profiles, key=lambda p: (abs(when[p] - middle[report]), when[p]))[:nearest],
                           key=lambda p: when[p])
            for report in reports}


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: not a JSON object")
    return data


def _date(path: Path, data: dict, key: str) -> float:
    """A result file's date field (written as "%Y-%m-%d %H:%M:%S %Z", UTC here) -> epoch seconds."""
    import calendar

    try:
        return calendar.timegm(time.strptime(data[key].rsplit(" ", 1)[0], "%Y-%m-%d %H:%M:%S"))
    except (KeyError, AttributeError, ValueError):
        raise SystemExit(f"{path}: no {key!r} date (as \"2026-11-28 21:00:00 UTC\") to pair by") from None


def _row(policy: str, load: float, live: list[tuple], sim: list[tuple]) -> dict:
    (live_att, live_ttft), (sim_att, sim_ttft) = zip(*live, strict=True), zip(*sim, strict=True)
    return {"policy": policy, "load": load, "live": list(live_att), "simulated": list(sim_att),
            "live_mean": statistics.mean(live_att), "simulated_mean": statistics.mean(sim_att),
            "gap_of_means_pp": abs(statistics.mean(live_att) - statistics.mean(sim_att)) * 100,
            "live_ttft_p50_mean": statistics.mean(live_ttft),
            "simulated_ttft_p50_mean": statistics.mean(sim_ttft)}


def print_table(rows: list[dict]) -> None:
    print(f"{'policy':>8} {'load':>6} {'live runs':>10} {'live range %':>14} {'live mean':>10} "
          f"{'sim range %':>14} {'sim mean':>9} {'gap pp':>7} {'TTFT p50 live/sim s':>20}")
    for r in rows:
        print(f"{r['policy']:>8} {r['load']:>6g} {len(r['live']):>10} "
              f"{min(r['live']) * 100:>6.1f}-{max(r['live']) * 100:<6.1f} {r['live_mean'] * 100:>10.1f} "
              f"{min(r['simulated']) * 100:>6.1f}-{max(r['simulated']) * 100:<6.1f} "
              f"{r['simulated_mean'] * 100:>9.1f} {r['gap_of_means_pp']:>7.1f} "
              f"{r['live_ttft_p50_mean']:>9.2f}/{r['simulated_ttft_p50_mean']:<10.2f}")


if __name__ == "__main__":
    sys.exit(main())
