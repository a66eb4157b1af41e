"""The ground floor of the fast path: the C++ kernels (``fastdream.fast._ops``) as torch ops (``ops``) and process
settings (``runtime``). Imports nothing of fastdream's. Load ``_ops`` after torch (``ops`` does): it then binds to
the libgomp torch loaded and runs on torch's own OpenMP threads."""
