import pvkernels  # noqa: F401  (builds/loads the C++ extension before any timing)

from .harness import write_results


def pytest_terminal_summary(terminalreporter):
    write_results(terminalreporter)
