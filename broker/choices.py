"""Names the CLI offers as choices, apart from the modules that implement them.

Building the parser must not import an FFT or HDF5 library: every part (broker, sink,
worker, recorder, ``run`` itself) builds the whole parser, and pyfftw (which imports
scipy) plus h5py cost a loaded 2-core machine seconds of start-up per process; nor
the bench and tune modules (they import the broker, psutil and the bench suite).
broker/fft.py, broker/recorder.py, broker/benchmark.py and broker/tune.py use these
same tuples.
"""
COLORS = ("gray", "channels")
OUTPUTS = ("spectrum", "magnitude", "radial", "peak")
BACKENDS = ("pyfftw", "scipy", "numpy", "auto")
PLANNERS = {"estimate": "FFTW_ESTIMATE", "measure": "FFTW_MEASURE", "patient": "FFTW_PATIENT"}
COMPRESSIONS = ("none", "lz4", "bslz4", "zstd", "gzip")
BENCH_PARTS = ("transport", "fft", "hdf5", "e2e", "shards")
# tune's dimensions, in the order they run (the first ones matter most)
TUNE_DIMENSIONS = ("transport", "fft", "workers", "recorder", "hwm")
