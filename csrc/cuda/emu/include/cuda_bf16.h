// CPU emulation stand-in for the CUDA header of the same name (see ../README.md).
#pragma once
#include "emu.h"
