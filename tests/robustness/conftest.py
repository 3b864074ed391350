"""Prints the robustness suite's counts (bad inputs tried, tracebacks, files lost) after the run."""


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tally = getattr(config, "_lmforge_robustness", None)
    if tally:
        terminalreporter.write_line(
            f"robustness corpus: {tally['tried']} bad inputs tried ({tally['subprocess']} through a real "
            f"process), {tally['tracebacks']} tracebacks, {tally['files_lost']} files lost or changed, "
            f"{tally['partial']} partial outputs, {tally['not_refused']} not refused")
