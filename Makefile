# make -j      builds the TensorFlow op library and the pybind11 host utilities
# make mnist   the main job: sparse MNIST with Rig-L and its connectivity GIF
# make mnist-distributed  the main job on two local workers (MultiWorkerMirroredStrategy)
# make bench   the performance table (make bench-quick: a two-minute subset)
# make bench-peers  our op beside PyTorch dense and CSR, SparseProp and scipy CSR (optional packages)
# make test    installs what is missing, builds, fetches MNIST, runs the tests
# make test-slow  the longer training runs
# make clean   removes what make built
PYTHON ?= python3
# The scripts import this checkout's packages (a user may `pip install .` instead).
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
MAKEFLAGS += --no-builtin-rules
.SUFFIXES:
BUILD := build
CC_DIR := ipu_sparse_ops/cc
OP_LIB := ipu_sparse_ops/libsparse_matmul_ops.so
HOST_UTILS := ipu_sparse_ops/host_utils$(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
DEPS_STAMP := $(BUILD)/requirements.stamp
DATA_STAMP := $(BUILD)/mnist.stamp

CXXFLAGS := -O3 -fPIC -Wall -Wextra -Wno-unused-parameter -MMD -MP
# Compile and link flags of the installed TensorFlow (TF_CFLAGS, TF_LFLAGS),
# written once by the rule below instead of importing TensorFlow on every make.
# Its headers are system headers, so their warnings do not bury ours.
TF_FLAGS_MK := $(BUILD)/tf_flags.mk
-include $(TF_FLAGS_MK)

# The kernels are compiled once per instruction set; the library picks one at
# run time, so one build runs on any x86-64 CPU.
ifeq ($(shell uname -m),x86_64)
ISAS := generic avx2 avx512
else
ISAS := generic
endif
ISA_FLAGS_generic := -DIPU_ISA_TABLE=kGenericKernels -DIPU_ISA_NAME='"generic"'
ISA_FLAGS_avx2 := -march=x86-64-v3 -DIPU_ISA_TABLE=kAvx2Kernels -DIPU_ISA_NAME='"avx2"'
ISA_FLAGS_avx512 := -march=x86-64-v4 -DIPU_ISA_TABLE=kAvx512Kernels -DIPU_ISA_NAME='"avx512"'

# Sources that know nothing of TensorFlow (the ISA kernels are compiled apart, below).
PLAIN_NAMES := sparse_pattern sparse_kernels claiming_parallel_for
PLAIN_OBJS := $(PLAIN_NAMES:%=$(BUILD)/%.o) \
              $(foreach isa,$(ISAS),$(BUILD)/sparse_kernels_isa_$(isa).o)
TF_OBJS := $(BUILD)/sparse_matmul_ops.o $(BUILD)/sparse_matmul_kernels.o

.PHONY: all clean deps data test test-slow selfcheck mnist mnist-distributed bench bench-quick bench-peers
all: $(OP_LIB) $(HOST_UTILS)

$(OP_LIB): $(TF_OBJS) $(PLAIN_OBJS)
	$(CXX) -shared -o $@ $^ $(TF_LFLAGS)

$(HOST_UTILS): $(CC_DIR)/host_utils.cc $(BUILD)/sparse_pattern.o | $(BUILD) $(DEPS_STAMP)
	$(CXX) $(CXXFLAGS) -MF $(BUILD)/host_utils.d -std=c++17 -shared $(shell $(PYTHON) -m pybind11 --includes) -o $@ $< $(BUILD)/sparse_pattern.o

$(PLAIN_NAMES:%=$(BUILD)/%.o): $(BUILD)/%.o: $(CC_DIR)/%.cc | $(BUILD)
	$(CXX) $(CXXFLAGS) -std=c++17 -c -o $@ $<

$(BUILD)/sparse_kernels_isa_%.o: $(CC_DIR)/sparse_kernels_isa.cc | $(BUILD)
	$(CXX) $(CXXFLAGS) -std=c++17 $(ISA_FLAGS_$*) -c -o $@ $<

$(TF_OBJS): $(BUILD)/%.o: $(CC_DIR)/%.cc $(TF_FLAGS_MK) | $(BUILD)
	$(CXX) $(CXXFLAGS) -Wno-deprecated-declarations $(TF_CFLAGS) -c -o $@ $<

$(TF_FLAGS_MK): $(DEPS_STAMP) | $(BUILD)
	$(PYTHON) -c 'import tensorflow as tf; \
	print("TF_CFLAGS :=", " ".join(f.replace("-I", "-isystem ", 1) for f in tf.sysconfig.get_compile_flags())); \
	print("TF_LFLAGS :=", " ".join(tf.sysconfig.get_link_flags()))' > $@.tmp 2>/dev/null
	mv $@.tmp $@

# Installs the pinned packages once per change of requirements.txt.
deps: $(DEPS_STAMP)
$(DEPS_STAMP): requirements.txt | $(BUILD)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

# MNIST from the first source found (see mnist_rigl/mnist_data.py), cached once.
data: $(DATA_STAMP)
$(DATA_STAMP): | $(DEPS_STAMP)
	$(PYTHON) mnist_rigl/mnist_data.py --prepare
	touch $@

$(BUILD):
	mkdir -p $@

test: all $(DATA_STAMP)
	$(PYTHON) -m pytest -q tests

# The longer training runs (pytest marker `slow`); exit 5 means none exist yet.
test-slow: all $(DATA_STAMP)
	$(PYTHON) -m pytest -q -m slow tests || [ $$? -eq 5 ]

# The performance table (op vs the faster of TensorFlow's dense matmul with oneDNN off
# and on, and MNIST end to end); bench-quick is a subset.
bench: all $(DATA_STAMP) $(BUILD)/fma_peak
	PYTHONPATH=. $(PYTHON) bench/benchmark.py
bench-quick: all $(DATA_STAMP) $(BUILD)/fma_peak
	PYTHONPATH=. $(PYTHON) bench/benchmark.py --quick

# Our op beside the sparse libraries a user would try, same patterns, same run. The
# peers are optional (bench/requirements-peers.txt); a missing one is one skipped line.
bench-peers: all
	PYTHONPATH=. $(PYTHON) bench/peers.py

# The machine's float32 FMA peak, the yardstick of the table's "% peak".
$(BUILD)/fma_peak: bench/fma_peak.cc | $(BUILD)
	$(CXX) -O3 -std=c++17 -Wall -Wextra -o $@ $< -lpthread

selfcheck: all
	$(PYTHON) ipu_sparse_ops/tools/sparse_matmul.py

# The main job: sparse MNIST with Rig-L, then fc1's connectivity as PNGs and a GIF.
# This project's recipe (the README's results): the original's defaults but for
# SUM-pooled ranking, plain momentum 0.9, and a prune schedule whose first
# update moves the full ratio.
RECORDS := rigl_records
MNIST_RECIPE := --pooling-type SUM --optimizer-arg momentum=0.9 --optimizer-arg use_nesterov=false \
                --cosine-prune-schedule '{"zero_steps": 1}'
mnist: all $(DATA_STAMP)
	$(PYTHON) mnist_rigl/sparse_mnist.py --densities 0.1 0.3 $(MNIST_RECIPE) \
	    --records-path $(RECORDS) --checkpoint-path $(BUILD)/checkpoints
	$(PYTHON) mnist_rigl/visualise_connectivity.py --records-path $(RECORDS) --animate
	$(PYTHON) mnist_rigl/visualise_connectivity.py --records-path $(RECORDS)

# The main job data-parallel: two workers on 127.0.0.1 (free ports, one TF_CONFIG
# each, one thread each), the global batch split between them; the chief writes the
# records and checkpoints. Every worker needs the same seed.
MNIST_SEED ?= 1
mnist-distributed: all $(DATA_STAMP)
	$(PYTHON) -m ipu_sparse_ops.tools.local_cluster --workers 2 --threads 1 -- \
	    $(PYTHON) mnist_rigl/sparse_mnist.py --densities 0.1 0.3 $(MNIST_RECIPE) \
	    --distribute multi-worker --seed $(MNIST_SEED) \
	    --records-path $(RECORDS)-distributed --checkpoint-path $(BUILD)/checkpoints-distributed

clean:
	rm -rf $(BUILD) $(OP_LIB) $(HOST_UTILS)

# Header dependencies written by -MMD; they are never rebuilt by a rule.
$(BUILD)/%.d: ;
-include $(wildcard $(BUILD)/*.d)

# AddressSanitizer build of the op and the host utilities (same sources, same
# TensorFlow flags) under build/asan/, for the fuzz suite only: run_asan.py
# loads it in a child process with the ASan runtime preloaded. ASAN_SRC and
# ASAN_BUILD let a copy of the sources be built elsewhere.
ASAN_SRC ?= $(CC_DIR)
ASAN_BUILD ?= $(BUILD)/asan
ASAN_FLAGS := -fsanitize=address -fno-omit-frame-pointer -O1 -g
ASAN_CXXFLAGS := $(filter-out -O3,$(CXXFLAGS)) $(ASAN_FLAGS)
ASAN_LIB := $(ASAN_BUILD)/libsparse_matmul_ops.so
ASAN_HOST_UTILS := $(ASAN_BUILD)/$(notdir $(HOST_UTILS))
ASAN_PLAIN_OBJS := $(PLAIN_NAMES:%=$(ASAN_BUILD)/%.o) \
                   $(foreach isa,$(ISAS),$(ASAN_BUILD)/sparse_kernels_isa_$(isa).o)
ASAN_TF_OBJS := $(ASAN_BUILD)/sparse_matmul_ops.o $(ASAN_BUILD)/sparse_matmul_kernels.o
.PHONY: asan test-fuzz-asan
asan: $(ASAN_LIB) $(ASAN_HOST_UTILS)

$(ASAN_LIB): $(ASAN_TF_OBJS) $(ASAN_PLAIN_OBJS)
	$(CXX) -shared $(ASAN_FLAGS) -o $@ $^ $(TF_LFLAGS)

$(ASAN_HOST_UTILS): $(ASAN_SRC)/host_utils.cc $(ASAN_BUILD)/sparse_pattern.o | $(ASAN_BUILD) $(DEPS_STAMP)
	$(CXX) $(ASAN_CXXFLAGS) -MF $(ASAN_BUILD)/host_utils.d -std=c++17 -shared $(shell $(PYTHON) -m pybind11 --includes) -o $@ $< $(ASAN_BUILD)/sparse_pattern.o

$(PLAIN_NAMES:%=$(ASAN_BUILD)/%.o): $(ASAN_BUILD)/%.o: $(ASAN_SRC)/%.cc | $(ASAN_BUILD)
	$(CXX) $(ASAN_CXXFLAGS) -std=c++17 -c -o $@ $<

$(ASAN_BUILD)/sparse_kernels_isa_%.o: $(ASAN_SRC)/sparse_kernels_isa.cc | $(ASAN_BUILD)
	$(CXX) $(ASAN_CXXFLAGS) -std=c++17 $(ISA_FLAGS_$*) -c -o $@ $<

$(ASAN_TF_OBJS): $(ASAN_BUILD)/%.o: $(ASAN_SRC)/%.cc $(TF_FLAGS_MK) | $(ASAN_BUILD)
	$(CXX) $(ASAN_CXXFLAGS) -Wno-deprecated-declarations $(TF_CFLAGS) -c -o $@ $<

$(ASAN_BUILD):
	mkdir -p $@

# A bounded fuzz run (tests/test_fuzz_op.py, profile `asan`) against the ASan
# build in a child process; fails on any ASan report, crash or wrong result.
test-fuzz-asan: asan $(OP_LIB)
	$(PYTHON) tests/fuzz/run_asan.py --library $(ASAN_LIB) --host-utils $(ASAN_HOST_UTILS) --isa best,generic

-include $(wildcard $(ASAN_BUILD)/*.d)
