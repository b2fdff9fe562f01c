"""A fake CANN tree for the Ascend contract tests, and a recording stand-in for the aclnn functions.

The headers carry the prototypes of docs/spec §5 verbatim (read from the Ascend twin's headers in
ms_nsa/twin_cann/, typed out from the spec independently of ops_yaml/, so that the yaml is checked
against them, not against itself). The stand-in library
defines aclnnNsaSelectedAttention(Grad)GetWorkspaceSize with those prototypes and logs every
argument; the driver plays MindSpore's CustomV2AclnnKernelMod: it builds the `inputs` vector the way
the kernel converts its inputs (by `custom_inputs_type`) and calls the callback MindSpore generated.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path
from typing import List, Sequence

import mindspore as ms

HEADERS = {"aclnnNsaSelectedAttention": "aclnn_nsa_selected_attention.h",
           "aclnnNsaSelectedAttentionGrad": "aclnn_nsa_selected_attention_grad.h"}
# The prototypes as the Ascend twin's stand-in CANN tree declares them (typed out from the spec there).
TWIN_HEADERS = Path(__file__).resolve().parent.parent / "ms_nsa" / "twin_cann" / "include" / "aclnnop"


def _prototype(name: str) -> str:
    text = (TWIN_HEADERS / HEADERS[name]).read_text(encoding="utf-8")
    start = text.index(f"aclnnStatus {name}GetWorkspaceSize(")
    return text[start:text.index(");", start) + 2]


FORWARD_PROTOTYPE = _prototype("aclnnNsaSelectedAttention")
GRAD_PROTOTYPE = _prototype("aclnnNsaSelectedAttentionGrad")
PROTOTYPES = {"aclnnNsaSelectedAttention": FORWARD_PROTOTYPE, "aclnnNsaSelectedAttentionGrad": GRAD_PROTOTYPE}

ACL_BASE_H = """#ifndef FAKE_ACL_BASE_H
#define FAKE_ACL_BASE_H
#include <stdint.h>
#include <stddef.h>
typedef int aclnnStatus;
typedef void *aclrtStream;
#endif
"""

# Handles as the stand-in sees them (the real ones are opaque CANN objects).
HANDLES = """struct aclTensor { const char *tag; };
struct aclIntArray { int64_t size; const int64_t *values; };
"""

HEADER_TEMPLATE = """#ifndef {guard}
#define {guard}
#include "acl/acl_base.h"
#ifdef __cplusplus
extern "C" {{
#endif
typedef struct aclTensor aclTensor;
typedef struct aclIntArray aclIntArray;
typedef struct aclOpExecutor aclOpExecutor;
{prototype}
aclnnStatus {name}(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream stream);
#ifdef __cplusplus
}}
#endif
#endif
"""

# One argument per line in the log: "tensor <tag>", "null", "int_array 1,2", "double <v>", "int <v>",
# "str <s>", "workspace_size" / "executor" (non-null pointers).
RECORDER_C = r"""
#include <stdio.h>
#include <string.h>
#include "aclnnop/aclnn_nsa_selected_attention.h"
#include "aclnnop/aclnn_nsa_selected_attention_grad.h"
HANDLES
static char log_buffer[1 << 16];
static size_t log_used;
static void put(const char *text) {
  size_t n = strlen(text);
  if (log_used + n + 1 < sizeof(log_buffer)) { memcpy(log_buffer + log_used, text, n); log_used += n;
    log_buffer[log_used++] = '\n'; log_buffer[log_used] = 0; }
}
static void tensor(const aclTensor *t) { char b[256]; snprintf(b, sizeof b, "tensor %s", t->tag);
  put(t ? b : "null"); }
static void maybe_tensor(const aclTensor *t) { if (t) tensor(t); else put("null"); }
static void int_array(const aclIntArray *a) {
  char b[8192]; size_t used = 0;
  if (!a) { put("null"); return; }
  used += snprintf(b, sizeof b, "int_array ");
  for (int64_t i = 0; i < a->size; ++i) used += snprintf(b + used, sizeof b - used, i ? ",%lld" : "%lld",
                                                         (long long)a->values[i]);
  put(b);
}
static void f64(double v) { char b[64]; snprintf(b, sizeof b, "double %.17g", v); put(b); }
static void i64(int64_t v) { char b[64]; snprintf(b, sizeof b, "int %lld", (long long)v); put(b); }
static void str(const char *s) { char b[256]; snprintf(b, sizeof b, "str %s", s ? s : "(null)"); put(b); }
static void tail(uint64_t *w, aclOpExecutor **e) { put(w ? "workspace_size" : "null"); put(e ? "executor" : "null");
  if (w) *w = 0; }
const char *recorded(void) { return log_buffer; }
void clear_record(void) { log_used = 0; log_buffer[0] = 0; }

STAND_INS""".replace("HANDLES", HANDLES)

# How the stand-in logs a parameter of each type (the parameter name replaces NAME).
_LOGGERS = {"aclTensor*": "maybe_tensor(NAME);", "aclIntArray*": "int_array(NAME);", "double": "f64(NAME);",
            "int64_t": "i64(NAME);", "char*": "str(NAME);"}


def _parameters(prototype: str):
    """[(type, name)] of a prototype, types spelled as MindSpore spells them ("aclTensor*")."""
    body = prototype[prototype.index("(") + 1:prototype.rindex(")")]
    result = []
    for parameter in body.split(","):
        words = parameter.replace("const ", "").replace("*", " * ").split()
        result.append(("".join(words[:-1]), words[-1]))
    return result


def _stand_in(prototype: str) -> str:
    """The prototype made a definition that logs every argument in order (from the spec's text alone)."""
    lines = [_LOGGERS[kind].replace("NAME", name) for kind, name in _parameters(prototype)[:-2]]
    return prototype.rstrip(";") + " {\n  " + "\n  ".join(lines) + "\n  tail(workspaceSize, executor);\n  return 0;\n}\n"


RECORDER_C = RECORDER_C.replace("STAND_INS", "\n".join(_stand_in(p) for p in PROTOTYPES.values()))

# Plays CustomV2AclnnKernelMod::CallGetWorkSpaceSize: one void* per input (tensors and arrays as handles,
# scalars as pointers to their value, strings as char*), then the outputs, then the callback.
DRIVER_CC = r"""
#include <dlfcn.h>
#include <stdint.h>
#include <vector>
#include <string>
typedef struct aclOpExecutor aclOpExecutor;
HANDLES
// kinds: 0 null, 1 tensor (text = tag), 2 int array (ints), 3 double, 4 int64, 5 string (text)
extern "C" int drive(const char *callback_library, const char *callback_name, void *aclnn_function, int count,
                     const int *kinds, const char **texts, const int64_t *int_offsets, const int64_t *ints,
                     const double *doubles, int output_count, const char **output_tags) {
  void *library = dlopen(callback_library, RTLD_NOW | RTLD_LOCAL);
  if (!library) return -100;
  typedef int (*Callback)(void *, std::vector<void *>, std::vector<void *>, uint64_t *, aclOpExecutor **);
  Callback callback = reinterpret_cast<Callback>(dlsym(library, callback_name));
  if (!callback) return -101;
  std::vector<aclTensor> tensors(count + output_count);
  std::vector<aclIntArray> arrays(count);
  std::vector<void *> inputs, outputs;
  for (int i = 0; i < count; ++i) {
    switch (kinds[i]) {
      case 0: inputs.push_back(nullptr); break;
      case 1: tensors[i].tag = texts[i]; inputs.push_back(&tensors[i]); break;
      case 2: arrays[i].size = int_offsets[i + 1] - int_offsets[i]; arrays[i].values = ints + int_offsets[i];
              inputs.push_back(&arrays[i]); break;
      case 3: inputs.push_back(const_cast<double *>(doubles + i)); break;
      case 4: inputs.push_back(const_cast<int64_t *>(ints + int_offsets[i])); break;
      case 5: inputs.push_back(const_cast<char *>(texts[i])); break;
      default: return -102;
    }
  }
  for (int i = 0; i < output_count; ++i) { tensors[count + i].tag = output_tags[i]; outputs.push_back(&tensors[count + i]); }
  uint64_t workspace_size = 0;
  aclOpExecutor *executor = nullptr;
  int status = callback(aclnn_function, inputs, outputs, &workspace_size, &executor);
  return status;
}
""".replace("HANDLES", HANDLES)


def parameter_names(prototype: str) -> List[str]:
    return [name for _, name in _parameters(prototype)]


class FakeCann:
    """Creates <root>/cann/{opp, include/acl, include/aclnnop} and builds the stand-in and the driver."""

    def __init__(self, root: Path, prototypes=PROTOTYPES, stand_ins=True):
        if "opp" in str(root):
            raise ValueError("MindSpore finds the include dir by splitting ASCEND_OPP_PATH at 'opp'")
        self.root = root / "cann"
        self.opp = self.root / "opp"
        include = self.root / "include"
        (include / "acl").mkdir(parents=True)
        (include / "aclnnop").mkdir()
        self.opp.mkdir()
        (include / "acl" / "acl_base.h").write_text(ACL_BASE_H)
        for name, prototype in prototypes.items():
            guard = HEADERS[name].upper().replace(".", "_")
            (include / "aclnnop" / HEADERS[name]).write_text(
                HEADER_TEMPLATE.format(guard=guard, prototype=prototype, name=name))
        self.include = include
        if stand_ins:   # the recorder includes the headers, so it also checks its own prototypes
            self.recorder = self._compile("recorder.c", RECORDER_C, ["gcc"])
            self.driver = self._compile("driver.cc", DRIVER_CC, ["g++", "-std=c++17", "-D_GLIBCXX_USE_CXX11_ABI=0"])

    def _compile(self, file_name: str, source: str, compiler: Sequence[str]) -> ctypes.CDLL:
        path = self.root / file_name
        path.write_text(source)
        library = path.with_suffix(".so")
        subprocess.run([*compiler, "-shared", "-fPIC", "-I", str(self.include), "-o", str(library), str(path),
                        "-ldl"], check=True, capture_output=True, text=True)
        return ctypes.CDLL(str(library))

    def aclnn_function(self, name: str) -> int:
        return ctypes.cast(getattr(self.recorder, f"{name}GetWorkspaceSize"), ctypes.c_void_p).value

    def call(self, custom_callback_func: str, aclnn_name: str, inputs_type: Sequence[str], arguments: Sequence,
             tags: dict, output_tags: Sequence[str]) -> List[str]:
        """Runs MindSpore's generated callback on `arguments` converted by `inputs_type`; returns the log.

        The conversion is the kernel's: a tensor type takes a Tensor or None, an aclIntArray* a tuple of
        ints, double a float, int64_t an int, char* a str; anything else fails here as it would there.
        `tags` maps id(Tensor) to the name the stand-in logs.
        """
        assert len(arguments) == len(inputs_type) - len(output_tags), (
            f"{len(arguments)} arguments for {len(inputs_type) - len(output_tags)} aclnn inputs")
        kinds, texts, offsets, ints, doubles = [], [], [0], [], []
        keep = []
        for position, (kind, value) in enumerate(zip(inputs_type, arguments)):
            text, double = None, 0.0
            if kind == "aclTensor*":
                assert value is None or isinstance(value, ms.Tensor), (
                    f"input {position} is an aclTensor* but ms_nsa passes {value!r}")
                code = 0 if value is None else 1
                text = None if value is None else tags[id(value)].encode()
            elif kind == "aclIntArray*":
                assert isinstance(value, tuple) and all(type(v) is int for v in value), (
                    f"input {position} is an aclIntArray* but ms_nsa passes {value!r}")
                code = 2
                ints.extend(value)
            elif kind == "double":
                assert isinstance(value, float), f"input {position} is a double but ms_nsa passes {value!r}"
                code, double = 3, value
            elif kind == "int64_t":
                assert type(value) is int, f"input {position} is an int64_t but ms_nsa passes {value!r}"
                code = 4
                ints.append(value)
            elif kind == "char*":
                assert isinstance(value, str), f"input {position} is a char* but ms_nsa passes {value!r}"
                code, text = 5, value.encode()
            else:
                raise AssertionError(f"unexpected aclnn type {kind}")
            kinds.append(code)
            texts.append(text)
            keep.append(text)
            offsets.append(len(ints))
            doubles.append(double)
        count = len(kinds)
        self.recorder.recorded.restype = ctypes.c_char_p
        self.recorder.clear_record()
        library, function = custom_callback_func.rsplit(":", 1)
        status = self.driver.drive(
            library.encode(), f"{function}GetWorkSpaceSize".encode(), ctypes.c_void_p(self.aclnn_function(aclnn_name)),
            count, (ctypes.c_int * count)(*kinds), (ctypes.c_char_p * count)(*texts),
            (ctypes.c_int64 * len(offsets))(*offsets), (ctypes.c_int64 * max(1, len(ints)))(*ints),
            (ctypes.c_double * count)(*doubles), len(output_tags),
            (ctypes.c_char_p * len(output_tags))(*[t.encode() for t in output_tags]))
        assert status == 0, f"driver/callback returned {status}"
        return self.recorder.recorded().decode().splitlines()


def environment(cann: FakeCann, cache: Path) -> dict:
    return {"ASCEND_OPP_PATH": str(cann.opp), "MS_COMPILER_CACHE_PATH": str(cache) + os.sep,
            "ASCEND_CUSTOM_OPP_PATH": None}
