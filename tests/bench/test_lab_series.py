"""bench.lab reads `btmm lab` output: what it counts as a pass, the paths, the retries."""

from __future__ import annotations

from bench.lab import Series, parse_run, table

GOOD = """\
tunnels up 1.0 s after `btmm up` started on both hosts; first ping by name answered after 0.8 s
  path desktop -> laptop: mapped 203.0.113.3:4500, rtt 1.2 ms (up), handshake retries 0
  path laptop -> desktop: mapped 203.0.113.2:4500, rtt 3.3 ms (up), handshake retries 1
  20 MB to fd4b::1 in 0.24 s: 657 Mbit/s, 60907 packets/s out; SHA-256 matches
  the same TCP connection finished: 24 MB in 12.0 s, SHA-256 matches
  path desktop -> laptop: lan 192.168.1.11:4500, rtt 98.0 ms (up), handshake retries 0
  path laptop -> desktop: lan 192.168.1.10:4500, rtt 2.1 ms (up), handshake retries 0
"""


def test_a_good_run_is_read_whole() -> None:
    run = parse_run(GOOD, 0, 18.0)
    assert run.ok and run.first_ping == 0.8 and run.tunnels_up == 1.0 and run.mbit_s == 657
    assert run.paths == ("mapped", "mapped") and run.final_paths == ("lan", "lan")
    assert run.handshake_retries == 1  # counted at the cold start only


def test_a_differing_checksum_or_exit_status_fails_the_run() -> None:
    assert not parse_run(GOOD.replace("SHA-256 matches", "SHA-256 DIFFERS", 1), 0, 1).ok
    bad = parse_run(GOOD + "lab failed: no ping answer\n", 1, 30)
    assert not bad.ok and bad.failure == "lab failed: no ping answer"
    assert not parse_run("lab failed: no ping answer from x after 30 s\n", 1, 30).ok


def test_summary_counts_the_longest_streak_and_totals_retries() -> None:
    series = Series("roam-home", "mixed")
    good, bad = parse_run(GOOD, 0, 18), parse_run("lab failed: x\n", 1, 30)
    series.runs = [good, bad, good, good]
    s = series.summary()
    assert (s["passed"], s["runs"], s["longest_streak"]) == (3, 4, 2)
    assert s["paths"] == ["mapped → lan"] and s["handshake_retries_total"] == 3
    assert s["runs_with_retries"] == 3 and s["failures"] == ["lab failed: x"]
    assert "| roam-home | fast/python | 3/4 |" in table([s])


def test_a_run_that_printed_nothing_says_what_it_wrote_to_stderr() -> None:
    run = parse_run("", 1, 0.5, "Traceback ...\nSyntaxError: invalid syntax\n")
    assert not run.ok and run.failure == "SyntaxError: invalid syntax"
    assert parse_run("", 1, 0.5).failure == "exit status 1"
