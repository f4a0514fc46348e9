// The launchers of gift_launch.cu compiled by the host compiler: with GIFT_EMULATION defined
// (the emulation build sets it for every source) the kernels run on the CPU under
// simt_emulator.h. Used only by the test suite's CPU build.
#ifndef GIFT_EMULATION
#error "gift_launch_emulated.cpp is only for the emulation build (define GIFT_EMULATION)"
#endif
#include "../gift_launch.cu"
