// HBM model for whole-model RTL simulation: one AXI4 slave per accelerator port,
// its data in C++ memory (sim/rtl/hbm_model.cpp) reached through DPI-C.
//
// The C++ side holds the whole flat HBM image (loaded from a bundle's hbm.bin by
// a file read) and maps each port-local address to the flat one: byte A of the
// flat space lives on port (A / S) % P at local address (A / (P*S)) * S + A % S.
//
// Timing per port: up to QDEPTH bursts accepted per direction; the C++ side
// (hbm_dpi_sched) says when the first read beat of a burst is due, then one beat
// per cycle; write data is accepted one beat per cycle once its AW is known,
// the B response comes BLAT cycles after the last beat, or later if the C++ side
// says so. With the ideal timing model (the default) the first read beat comes RLAT
// cycles after its AR was accepted; the card-like model (refresh, pages, bus
// occupancy, the HBM switch) is chosen at run time, without a rebuild.

module hbm_axi_port #(
    parameter integer PORT = 0,
    parameter integer DW = 256,
    parameter integer IDW = 1,
    parameter integer RLAT = 24,
    parameter integer BLAT = 8,
    parameter integer QDEPTH = 16
) (
    input  wire             clk,
    input  wire             rst,
    input  wire [IDW-1:0]   awid,
    input  wire [63:0]      awaddr,
    input  wire [7:0]       awlen,
    input  wire             awvalid,
    output wire             awready,
    input  wire [DW-1:0]    wdata,
    input  wire [DW/8-1:0]  wstrb,
    input  wire             wlast,
    input  wire             wvalid,
    output wire             wready,
    output wire [IDW-1:0]   bid,
    output wire [1:0]       bresp,
    output wire             bvalid,
    input  wire             bready,
    input  wire [IDW-1:0]   arid,
    input  wire [63:0]      araddr,
    input  wire [7:0]       arlen,
    input  wire             arvalid,
    output wire             arready,
    output reg  [IDW-1:0]   rid,
    output reg  [DW-1:0]    rdata,
    output wire [1:0]       rresp,
    output reg              rlast,
    output reg              rvalid,
    input  wire             rready
);
    import "DPI-C" function void hbm_dpi_read(input int port, input longint addr,
                                              output bit [1023:0] data);
    import "DPI-C" function void hbm_dpi_write(input int port, input longint addr,
                                               input bit [1023:0] data, input bit [127:0] strb);
    import "DPI-C" function longint hbm_dpi_sched(input int port, input int is_write,
                                                  input longint addr, input int beats,
                                                  input longint now, input int lat);

    localparam integer S = DW / 8;
    localparam integer QB = $clog2(QDEPTH);

    reg [63:0] now;
    always @(posedge clk) now <= rst ? 64'd0 : now + 64'd1;

    // ---------------- reads
    reg [63:0]    ar_addr [0:QDEPTH-1];
    reg [7:0]     ar_len  [0:QDEPTH-1];
    reg [IDW-1:0] ar_id   [0:QDEPTH-1];
    reg [63:0]    ar_due  [0:QDEPTH-1];
    reg [QB:0]    ar_wp, ar_rp;
    // occupancy modulo 2^(QB+1): the difference must be taken at the pointers' width (a
    // 32-bit difference of wrapped pointers never equals QDEPTH, and a full queue took more)
    wire [QB:0]   ar_cnt = ar_wp - ar_rp;
    wire ar_full = ar_cnt == QDEPTH;
    wire ar_empty = ar_wp == ar_rp;
    assign arready = !ar_full && !rst;
    reg [8:0] beat;
    bit [1023:0] rbuf;
    wire head_due = !ar_empty && (ar_due[ar_rp[QB-1:0]] <= now);
    wire load_next = (!rvalid || rready) && head_due;
    wire [63:0] head_addr = ar_addr[ar_rp[QB-1:0]] + {55'd0, beat} * S;
    assign rresp = 2'b00;

    always @(posedge clk) begin
        if (rst) begin
            ar_wp <= 0; ar_rp <= 0; rvalid <= 0; beat <= 0; rlast <= 0;
        end else begin
            if (arvalid && arready) begin
                ar_addr[ar_wp[QB-1:0]] <= araddr;
                ar_len[ar_wp[QB-1:0]] <= arlen;
                ar_id[ar_wp[QB-1:0]] <= arid;
                ar_due[ar_wp[QB-1:0]] <= hbm_dpi_sched(PORT, 0, araddr, {24'd0, arlen} + 32'd1,
                                                       now, RLAT);
                ar_wp <= ar_wp + 1;
            end
            if (rvalid && rready && !load_next)
                rvalid <= 0;
            if (load_next) begin
                hbm_dpi_read(PORT, head_addr, rbuf);
                rdata <= rbuf[DW-1:0];
                rid <= ar_id[ar_rp[QB-1:0]];
                rvalid <= 1;
                rlast <= beat == {1'b0, ar_len[ar_rp[QB-1:0]]};
                if (beat == {1'b0, ar_len[ar_rp[QB-1:0]]}) begin
                    beat <= 0;
                    ar_rp <= ar_rp + 1;
                end else begin
                    beat <= beat + 1;
                end
            end
        end
    end

    // ---------------- writes
    reg [63:0]    aw_addr [0:QDEPTH-1];
    reg [IDW-1:0] aw_id   [0:QDEPTH-1];
    reg [63:0]    aw_done [0:QDEPTH-1];     // earliest B response (0: BLAT alone decides)
    reg [QB:0]    aw_wp, aw_rp;
    wire [QB:0]   aw_cnt = aw_wp - aw_rp;
    wire aw_full = aw_cnt == QDEPTH;
    wire aw_empty = aw_wp == aw_rp;
    reg [63:0]    b_due [0:QDEPTH-1];
    reg [IDW-1:0] b_id  [0:QDEPTH-1];
    reg [QB:0]    b_wp, b_rp;
    wire [QB:0]   b_cnt = b_wp - b_rp;
    wire b_full = b_cnt == QDEPTH;
    wire b_empty = b_wp == b_rp;
    reg [8:0] wbeat;
    bit [1023:0] wbuf;
    bit [127:0] sbuf;
    assign awready = !aw_full && !rst;
    assign wready = !aw_empty && !b_full && !rst;
    assign bvalid = !b_empty && (b_due[b_rp[QB-1:0]] <= now);
    assign bid = b_id[b_rp[QB-1:0]];
    assign bresp = 2'b00;

    always @(posedge clk) begin
        if (rst) begin
            aw_wp <= 0; aw_rp <= 0; b_wp <= 0; b_rp <= 0; wbeat <= 0;
        end else begin
            if (awvalid && awready) begin
                aw_addr[aw_wp[QB-1:0]] <= awaddr;
                aw_id[aw_wp[QB-1:0]] <= awid;
                aw_done[aw_wp[QB-1:0]] <= hbm_dpi_sched(PORT, 1, awaddr, {24'd0, awlen} + 32'd1,
                                                        now, BLAT);
                aw_wp <= aw_wp + 1;
            end
            if (wvalid && wready) begin
                wbuf = 0;
                sbuf = 0;
                wbuf[DW-1:0] = wdata;
                sbuf[DW/8-1:0] = wstrb;
                hbm_dpi_write(PORT, aw_addr[aw_rp[QB-1:0]] + {55'd0, wbeat} * S, wbuf, sbuf);
                if (wlast) begin
                    wbeat <= 0;
                    aw_rp <= aw_rp + 1;
                    b_id[b_wp[QB-1:0]] <= aw_id[aw_rp[QB-1:0]];
                    b_due[b_wp[QB-1:0]] <= (aw_done[aw_rp[QB-1:0]] > now + BLAT)
                                           ? aw_done[aw_rp[QB-1:0]] : now + BLAT;
                    b_wp <= b_wp + 1;
                end else begin
                    wbeat <= wbeat + 1;
                end
            end
            if (bvalid && bready)
                b_rp <= b_rp + 1;
        end
    end
endmodule
