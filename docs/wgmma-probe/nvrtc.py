import ctypes, sys
lib = ctypes.CDLL(sys.argv[1]); src = open('probe.cu','rb').read(); arch = sys.argv[2]
prog = ctypes.c_void_p(); assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"probe.cu", 0, None, None) == 0
opts = [("--gpu-architecture=" + arch).encode(), b"-std=c++17"]
r = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
n = ctypes.c_size_t(); lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n)); log = ctypes.create_string_buffer(n.value); lib.nvrtcGetProgramLog(prog, log)
print(arch, "rc", r, log.value.decode()[:3000])
lib.nvrtcGetPTXSize(prog, ctypes.byref(n)); p = ctypes.create_string_buffer(n.value); lib.nvrtcGetPTX(prog, p)
open(sys.argv[3], "w").write(p.value.decode())
