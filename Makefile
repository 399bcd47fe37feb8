# make -j      builds the TensorFlow op library and the pybind11 host utilities
# make test    installs what is missing, builds, fetches MNIST, runs the tests
# make test-slow  the longer training runs
# make clean   removes what make built
PYTHON ?= python3
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

PLAIN_OBJS := $(BUILD)/sparse_pattern.o $(BUILD)/sparse_kernels.o \
              $(foreach isa,$(ISAS),$(BUILD)/sparse_kernels_isa_$(isa).o)
TF_OBJS := $(BUILD)/sparse_matmul_ops.o $(BUILD)/sparse_matmul_kernels.o

.PHONY: all clean deps data test test-slow selfcheck
all: $(OP_LIB) $(HOST_UTILS)

$(OP_LIB): $(TF_OBJS) $(PLAIN_OBJS)
	$(CXX) -shared -o $@ $^ $(TF_LFLAGS)

$(HOST_UTILS): $(CC_DIR)/host_utils.cc $(BUILD)/sparse_pattern.o | $(BUILD) $(DEPS_STAMP)
	$(CXX) $(CXXFLAGS) -MF $(BUILD)/host_utils.d -std=c++17 -shared $(shell $(PYTHON) -m pybind11 --includes) -o $@ $< $(BUILD)/sparse_pattern.o

$(BUILD)/sparse_pattern.o $(BUILD)/sparse_kernels.o: $(BUILD)/%.o: $(CC_DIR)/%.cc | $(BUILD)
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

selfcheck: all
	$(PYTHON) ipu_sparse_ops/tools/sparse_matmul.py

clean:
	rm -rf $(BUILD) $(OP_LIB) $(HOST_UTILS)

# Header dependencies written by -MMD; they are never rebuilt by a rule.
$(BUILD)/%.d: ;
-include $(wildcard $(BUILD)/*.d)
