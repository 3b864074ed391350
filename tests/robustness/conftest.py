"""Prints the robustness corpus's counts after the run: cases, tracebacks, files lost, over-memory, over-time
(and the largest peak memory and wall time seen, with their cases)."""


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tally = getattr(config, "_lmforge_robustness", None)
    if tally:
        terminalreporter.write_line(
            f"robustness corpus: {tally['tried']} cases ({tally['subprocess']} through a real process), "
            f"{tally['tracebacks']} tracebacks, {tally['files_lost']} files lost or changed, "
            f"{tally['partial']} partial outputs, {tally['not_refused']} not refused, "
            f"{tally['over_memory']} over memory, {tally['over_time']} over time; "
            f"largest peak RSS {tally['max_mb'][0]:,.0f} MiB ({tally['max_mb'][1]}), "
            f"slowest {tally['max_s'][0]:.1f} s ({tally['max_s'][1]})")
