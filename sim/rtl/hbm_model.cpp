// C++ memory behind sim/rtl/hbm_model.v: the flat HBM image, the port striping,
// per-port byte counters. The Verilog calls the hbm_dpi_* functions (DPI-C); the
// harness (sim/rtl/harness.py, inside the simulator process) calls the hbm_*
// functions through ctypes (the simulator is linked with -rdynamic).
//
// Flat byte A lives on port (A / S) % P at local address (A / (P*S)) * S + A % S.
//
// Timing (hbm_dpi_sched, called by the Verilog when it accepts an AR or an AW): the
// ideal model (mode 0, the default) gives every read burst its first beat RLAT cycles
// after the address, as the Verilog always did. The card-like model (mode 1, chosen
// at run time by hbm_timing(), so the same build runs either) keeps per channel a data
// bus that is busy until `free_at`, the open row and the earliest next activate of
// every bank, and the next refresh:
//   * latency: a page hit's first beat comes read_latency after the address, a miss
//     (another row open in the bank) page_miss later, and not before the bank's
//     previous activate plus tRC;
//   * bandwidth: a burst holds the bus for max(bytes, min_burst_bytes) at the channel's
//     rate plus burst_overhead; bursts queue behind each other (free_at);
//   * refresh: every tREFI the bus is taken for tRFC (once the burst in progress ends),
//     and the refresh closes every row;
//   * switch: port p reaches channel (p + channel_offset) mod channels; one whose
//     channel is not its own pays cross_latency and moves its beats cross_factor
//     times slower, and ports sharing a channel share its bus.
// Addresses map row-bank-column: column = addr % page_bytes, bank = (addr / page_bytes)
// % banks, row above. All times are in accelerator clock cycles (doubles; the Python
// side, llmfab.sim.memory_timing, converts the board's ns and GB/s).

#include <algorithm>
#include <cmath>
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

// ---- timing model (see the header comment)
enum {
    T_MODE, T_BEAT, T_RLAT, T_WLAT, T_MISS, T_TRC, T_PAGE, T_BANKS, T_TREFI, T_TRFC,
    T_OVERHEAD, T_CROSS_LAT, T_CROSS_FACTOR, T_OFFSET, T_MIN_BURST, T_CHANNELS, T_COUNT
};
double g_t[T_COUNT] = {0, 1, 24, 8, 0, 0, 1024, 16, 0, 0, 0, 0, 1, 0, 0, 1};

struct Channel {
    double free_at = 0;
    double next_ref = 0;
    std::vector<int64_t> open_row;
    std::vector<double> bank_ready;
};
std::vector<Channel> g_ch;
long long g_last_now = 0;
// totals since hbm_timing(): read bursts, write bursts, row misses, refreshes,
// bursts through the switch, cycles the bus was held (x1000)
uint64_t g_tstat[6];

void reset_channels() {
    int banks = std::max(1, static_cast<int>(g_t[T_BANKS]));
    g_ch.assign(kMaxPorts, Channel());
    for (auto& c : g_ch) {
        c.open_row.assign(banks, -1);
        c.bank_ready.assign(banks, 0.0);
        c.next_ref = g_t[T_TREFI];
    }
    g_last_now = 0;
}

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

// Set the timing model: `n` parameters in the order of the T_* enum (mode 0 ideal, 1
// card-like). Resets the channels' state and the timing counters. Returns 0, or -1 for
// a bad parameter list.
int hbm_timing(const double* p, int n) {
    if (n != T_COUNT) return -1;
    for (int i = 0; i < n; i++)
        if (!std::isfinite(p[i]) || p[i] < 0) return -1;
    if (p[T_BEAT] <= 0 || p[T_PAGE] < 1 || p[T_BANKS] < 1 || p[T_CROSS_FACTOR] < 1 ||
        p[T_CHANNELS] < 1 || p[T_CHANNELS] > kMaxPorts) return -1;
    std::copy(p, p + n, g_t);
    reset_channels();
    std::memset(g_tstat, 0, sizeof g_tstat);
    return 0;
}

// out[0..5]: read bursts, write bursts, row misses, refreshes, switch bursts, bus-busy cycles.
void hbm_timing_stats(uint64_t* out) {
    for (int i = 0; i < 5; i++) out[i] = g_tstat[i];
    out[5] = g_tstat[5] / 1000;
}

// ---- Verilog side (DPI-C) ---------------------------------------------------------------

// A burst of `beats` beats at port-local `addr` accepted at cycle `now`. Reads: the cycle
// its first beat is due (ideal: now + lat, lat being the Verilog's RLAT). Writes: the
// earliest cycle of its B response (ideal: 0, the Verilog's BLAT alone decides).
long long hbm_dpi_sched(int port, int is_write, long long addr, int beats, long long now, int lat) {
    if (g_t[T_MODE] == 0) return is_write ? 0 : now + lat;
    if (g_ch.empty() || now < g_last_now) reset_channels();     // first use, or after a reset
    g_last_now = now;
    int ch = (port + static_cast<int>(g_t[T_OFFSET])) % static_cast<int>(g_t[T_CHANNELS]);
    bool cross = ch != port;
    Channel& c = g_ch[ch];
    double t = static_cast<double>(now);
    uint64_t page = static_cast<uint64_t>(addr) / static_cast<uint64_t>(g_t[T_PAGE]);
    int banks = static_cast<int>(c.open_row.size());
    int bank = static_cast<int>(page % banks);
    int64_t row = static_cast<int64_t>(page / banks);
    double first = t + (is_write ? 0.0 : g_t[T_RLAT]) + (cross ? g_t[T_CROSS_LAT] : 0.0);
    if (c.open_row[bank] != row) {
        double act = std::max(t, c.bank_ready[bank]);
        c.bank_ready[bank] = act + g_t[T_TRC];
        c.open_row[bank] = row;
        first += (act - t) + g_t[T_MISS];        // wait for the bank, then activate
        g_tstat[2]++;
    }
    double s = std::max(first, c.free_at);
    double trefi = g_t[T_TREFI];
    if (trefi > 0) {
        while (c.next_ref <= s) {
            // due at next_ref, started once the burst in progress ends (in idle time it costs nothing)
            double rs = std::max(c.next_ref, c.free_at);
            double re = rs + g_t[T_TRFC];
            c.free_at = std::max(c.free_at, re);
            c.next_ref += trefi;
            g_tstat[3]++;
            if (re > s) s = re;
            std::fill(c.open_row.begin(), c.open_row.end(), -1);
        }
    }
    double bytes = std::max(static_cast<double>(beats) * g_stripe, g_t[T_MIN_BURST]);
    double dur = bytes / g_stripe * g_t[T_BEAT] * (cross ? g_t[T_CROSS_FACTOR] : 1.0) + g_t[T_OVERHEAD];
    c.free_at = s + dur;
    g_tstat[is_write ? 1 : 0]++;
    if (cross) g_tstat[4]++;
    g_tstat[5] += static_cast<uint64_t>(dur * 1000);
    if (is_write) return static_cast<long long>(std::ceil(s + dur + g_t[T_WLAT]));
    return static_cast<long long>(std::ceil(s));
}

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
