"""One file per op: reference, Triton kernels, launchers, C++ call, public function."""
