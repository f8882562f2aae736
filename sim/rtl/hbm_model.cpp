// C++ memory behind sim/rtl/hbm_model.v: the flat HBM image, the port striping,
// per-port byte counters. The Verilog calls the hbm_dpi_* functions (DPI-C); the
// harness (sim/rtl/harness.py, inside the simulator process) calls the hbm_*
// functions through ctypes (the simulator is linked with -rdynamic).
//
// Flat byte A lives on port (A / S) % P at local address (A / (P*S)) * S + A % S.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "svdpi.h"

namespace {

uint8_t* g_mem = nullptr;
uint64_t g_size = 0;
int g_ports = 1;
uint64_t g_stripe = 32;
const int kMaxPorts = 64;
uint64_t g_rd_bytes[kMaxPorts];
uint64_t g_wr_bytes[kMaxPorts];     // bytes with their strobe set
uint64_t g_rd_beats[kMaxPorts];
uint64_t g_wr_beats[kMaxPorts];
uint64_t g_oob = 0;                 // beats outside the memory (read as zeros / dropped)

inline uint64_t flat_of(int port, uint64_t local) {
    uint64_t line = local / g_stripe;
    return (line * g_ports + port) * g_stripe + local % g_stripe;
}

}  // namespace

extern "C" {

// ---- host side (ctypes) -----------------------------------------------------------------

// (Re)allocate a zeroed memory of `size` bytes for `ports` ports of `stripe`-byte beats.
int hbm_init(uint64_t size, int ports, uint64_t stripe) {
    if (ports < 1 || ports > kMaxPorts || stripe == 0) return -1;
    std::free(g_mem);
    g_mem = static_cast<uint8_t*>(std::calloc(size ? size : 1, 1));
    if (!g_mem) return -2;
    g_size = size;
    g_ports = ports;
    g_stripe = stripe;
    std::memset(g_rd_bytes, 0, sizeof g_rd_bytes);
    std::memset(g_wr_bytes, 0, sizeof g_wr_bytes);
    std::memset(g_rd_beats, 0, sizeof g_rd_beats);
    std::memset(g_wr_beats, 0, sizeof g_wr_beats);
    g_oob = 0;
    return 0;
}

// Copy a file (e.g. a bundle's hbm.bin) to flat address `addr`; returns bytes read or < 0.
int64_t hbm_load_file(const char* path, uint64_t addr) {
    FILE* f = std::fopen(path, "rb");
    if (!f) return -1;
    std::fseek(f, 0, SEEK_END);
    long n = std::ftell(f);
    std::fseek(f, 0, SEEK_SET);
    if (n < 0 || addr + static_cast<uint64_t>(n) > g_size) { std::fclose(f); return -2; }
    size_t got = std::fread(g_mem + addr, 1, static_cast<size_t>(n), f);
    std::fclose(f);
    return static_cast<int64_t>(got);
}

int hbm_write_bytes(uint64_t addr, const uint8_t* src, uint64_t n) {
    if (addr + n > g_size) return -1;
    std::memcpy(g_mem + addr, src, n);
    return 0;
}

int hbm_read_bytes(uint64_t addr, uint8_t* dst, uint64_t n) {
    if (addr + n > g_size) return -1;
    std::memcpy(dst, g_mem + addr, n);
    return 0;
}

int hbm_fill(uint64_t addr, uint8_t value, uint64_t n) {
    if (addr + n > g_size) return -1;
    std::memset(g_mem + addr, value, n);
    return 0;
}

// out[4*p + k]: k = 0 read bytes, 1 written (strobed) bytes, 2 read beats, 3 write beats.
void hbm_port_counters(uint64_t* out) {
    for (int p = 0; p < g_ports; p++) {
        out[4 * p + 0] = g_rd_bytes[p];
        out[4 * p + 1] = g_wr_bytes[p];
        out[4 * p + 2] = g_rd_beats[p];
        out[4 * p + 3] = g_wr_beats[p];
    }
}

void hbm_clear_counters(void) {
    std::memset(g_rd_bytes, 0, sizeof g_rd_bytes);
    std::memset(g_wr_bytes, 0, sizeof g_wr_bytes);
    std::memset(g_rd_beats, 0, sizeof g_rd_beats);
    std::memset(g_wr_beats, 0, sizeof g_wr_beats);
}

uint64_t hbm_out_of_range(void) { return g_oob; }

// ---- Verilog side (DPI-C) ---------------------------------------------------------------

void hbm_dpi_read(int port, long long addr, svBitVecVal* data) {
    uint8_t* out = reinterpret_cast<uint8_t*>(data);
    uint64_t flat = flat_of(port, static_cast<uint64_t>(addr));
    if (port < 0 || port >= g_ports || flat + g_stripe > g_size || addr % g_stripe) {
        std::memset(out, 0, g_stripe);
        g_oob++;
    } else {
        std::memcpy(out, g_mem + flat, g_stripe);
    }
    if (port >= 0 && port < kMaxPorts) {
        g_rd_bytes[port] += g_stripe;
        g_rd_beats[port]++;
    }
}

void hbm_dpi_write(int port, long long addr, const svBitVecVal* data, const svBitVecVal* strb) {
    const uint8_t* in = reinterpret_cast<const uint8_t*>(data);
    const uint8_t* st = reinterpret_cast<const uint8_t*>(strb);
    uint64_t flat = flat_of(port, static_cast<uint64_t>(addr));
    if (port < 0 || port >= g_ports || flat + g_stripe > g_size || addr % g_stripe) {
        g_oob++;
        return;
    }
    uint64_t n = 0;
    for (uint64_t i = 0; i < g_stripe; i++) {
        if (st[i >> 3] >> (i & 7) & 1) {
            g_mem[flat + i] = in[i];
            n++;
        }
    }
    g_wr_bytes[port] += n;
    g_wr_beats[port]++;
}

}  // extern "C"
