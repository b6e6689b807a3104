// SHA-256d over Bitcoin block headers: the scan kernel of idlerig's CUDA miner, compiled at
// run time by NVRTC for the GPU's own architecture.
//
// The host does per job what no nonce changes (src/mining/gpu_job.rs): the header's midstate,
// the first three rounds of the second block (whose words 0..2 are fixed), round 3 up to the
// nonce, and the message words 16, 17 and the fixed parts of 18 and 19. A thread then runs
// rounds 3..63 of block 2 and rounds 0..60 of the second hash: the digest's last word is
// IV[7] + e after round 60, so rounds 61..63 are skipped and a nonce is a candidate when that
// word, as the hash's top 32 bits, is at most the target's. The host re-checks every candidate
// in full before it is submitted.
//
// The same source compiles as C++ (without __CUDACC__): tests/sha256d_kernel.rs checks the
// per-nonce function against idlerig's own SHA-256d, and kernels/cpu_grid.cpp runs the whole
// scan kernel on CPU threads (blocks, barriers and atomics emulated) as the stand-in launcher
// that lets the host protocol of src/mining/gpu/ run without a GPU.

#ifdef __CUDACC__
#define DEV __device__ __forceinline__
#define ROTR(x, n) __funnelshift_r((x), (x), (n))
#define BSWAP(x) __byte_perm((x), 0, 0x0123)
typedef unsigned int u32;
#else
#include <stdint.h>
#define DEV static inline
#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
#define BSWAP(x) __builtin_bswap32(x)
typedef uint32_t u32;
#endif

// Written as single expressions of AND/OR/XOR so that the compiler emits one LOP3 each.
#define CH(e, f, g) (((e) & (f)) ^ (~(e) & (g)))
#define MAJ(a, b, c) (((a) & (b)) | ((c) & ((a) | (b))))
#define S0(a) (ROTR((a), 2) ^ ROTR((a), 13) ^ ROTR((a), 22))
#define S1(e) (ROTR((e), 6) ^ ROTR((e), 11) ^ ROTR((e), 25))
#define s0(w) (ROTR((w), 7) ^ ROTR((w), 18) ^ ((w) >> 3))
#define s1(w) (ROTR((w), 17) ^ ROTR((w), 19) ^ ((w) >> 10))

// One round with `kw` = K[i] + W[i]; the eight state words rotate by renaming, not moving.
#define ROUND(a, b, c, d, e, f, g, h, kw)                \
    do {                                                 \
        u32 t1 = (h) + S1(e) + CH((e), (f), (g)) + (kw); \
        (d) += t1;                                       \
        (h) = t1 + S0(a) + MAJ((a), (b), (c));           \
    } while (0)

#define R8(i, W)                                              \
    ROUND(a, b, c, d, e, f, g, h, K[(i) + 0] + W[(i) + 0]);   \
    ROUND(h, a, b, c, d, e, f, g, K[(i) + 1] + W[(i) + 1]);   \
    ROUND(g, h, a, b, c, d, e, f, K[(i) + 2] + W[(i) + 2]);   \
    ROUND(f, g, h, a, b, c, d, e, K[(i) + 3] + W[(i) + 3]);   \
    ROUND(e, f, g, h, a, b, c, d, K[(i) + 4] + W[(i) + 4]);   \
    ROUND(d, e, f, g, h, a, b, c, K[(i) + 5] + W[(i) + 5]);   \
    ROUND(c, d, e, f, g, h, a, b, K[(i) + 6] + W[(i) + 6]);   \
    ROUND(b, c, d, e, f, g, h, a, K[(i) + 7] + W[(i) + 7])

#ifdef __CUDACC__
__constant__
#else
static const
#endif
u32 K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

// Everything the host computes once per job. Layout shared with src/mining/gpu_job.rs.
struct Job {
    u32 mid[8];     // the midstate: SHA-256 state after the header's first 64 bytes
    u32 st[8];      // block 2's state after rounds 0..2 (a..h)
    u32 t1_base;    // round 3's T1 without W3 (the nonce)
    u32 t2_3;       // round 3's T2
    u32 w16, w17;   // block 2's message words 16 and 17
    u32 w18_base;   // W18 without sigma0(W3)
    u32 w19_base;   // W19 without W3
    u32 target_hi;  // a candidate's hash has its top 32 bits at most this
};

// The digest's last word (before byte order) for `nonce`, or its top 32 bits as the hash's
// little-endian number: returns BSWAP(IV[7] + e61), the value compared with target_hi.
DEV u32 sha256d_top(const Job& j, u32 nonce) {
    u32 W[64];
    const u32 w3 = BSWAP(nonce); // the header holds the nonce little-endian
    // Block 2, rounds 3..63, from the state after round 2.
    u32 a = j.st[0], b = j.st[1], c = j.st[2], d = j.st[3];
    u32 e = j.st[4], f = j.st[5], g = j.st[6], h = j.st[7];
    {
        u32 t1 = j.t1_base + w3;
        d += t1;
        h = t1 + j.t2_3;
    }
    // State renamed after round 3: (h, a, b, c, d, e, f, g) hold a..h.
    W[4] = 0x80000000u;
    W[5] = W[6] = W[7] = W[8] = W[9] = W[10] = W[11] = W[12] = W[13] = W[14] = 0;
    W[15] = 640;
    W[16] = j.w16;
    W[17] = j.w17;
    W[18] = j.w18_base + s0(w3);
    W[19] = j.w19_base + w3;
    W[20] = s1(W[18]) + s0(W[5]) + W[4];
    W[21] = s1(W[19]) + W[5];
    W[22] = s1(W[20]) + W[15];
    W[23] = s1(W[21]) + W[16];
    W[24] = s1(W[22]) + W[17];
    W[25] = s1(W[23]) + W[18];
    W[26] = s1(W[24]) + W[19];
    W[27] = s1(W[25]) + W[20];
    W[28] = s1(W[26]) + W[21];
    W[29] = s1(W[27]) + W[22];
    W[30] = s1(W[28]) + W[23] + s0(W[15]);
    W[31] = s1(W[29]) + W[24] + s0(W[16]) + W[15];
#pragma unroll
    for (int i = 32; i < 64; i++) W[i] = s1(W[i - 2]) + W[i - 7] + s0(W[i - 15]) + W[i - 16];
    ROUND(h, a, b, c, d, e, f, g, K[4] + W[4]);
    ROUND(g, h, a, b, c, d, e, f, K[5]);
    ROUND(f, g, h, a, b, c, d, e, K[6]);
    ROUND(e, f, g, h, a, b, c, d, K[7]);
    ROUND(d, e, f, g, h, a, b, c, K[8]);
    ROUND(c, d, e, f, g, h, a, b, K[9]);
    ROUND(b, c, d, e, f, g, h, a, K[10]);
    ROUND(a, b, c, d, e, f, g, h, K[11]);
    ROUND(h, a, b, c, d, e, f, g, K[12]);
    ROUND(g, h, a, b, c, d, e, f, K[13]);
    ROUND(f, g, h, a, b, c, d, e, K[14]);
    ROUND(e, f, g, h, a, b, c, d, K[15] + 640);
    // Rounds 16..63 with the schedule; after round 3 the names are rotated by one.
#pragma unroll
    for (int i = 16; i < 64; i += 8) {
        ROUND(d, e, f, g, h, a, b, c, K[i + 0] + W[i + 0]);
        ROUND(c, d, e, f, g, h, a, b, K[i + 1] + W[i + 1]);
        ROUND(b, c, d, e, f, g, h, a, K[i + 2] + W[i + 2]);
        ROUND(a, b, c, d, e, f, g, h, K[i + 3] + W[i + 3]);
        ROUND(h, a, b, c, d, e, f, g, K[i + 4] + W[i + 4]);
        ROUND(g, h, a, b, c, d, e, f, K[i + 5] + W[i + 5]);
        ROUND(f, g, h, a, b, c, d, e, K[i + 6] + W[i + 6]);
        ROUND(e, f, g, h, a, b, c, d, K[i + 7] + W[i + 7]);
    }
    // First hash: the midstate plus block 2's result. 61 rounds since round 3 have rotated
    // the names by five: a..h are now in d, e, f, g, h, a, b, c.
    W[0] = j.mid[0] + d;
    W[1] = j.mid[1] + e;
    W[2] = j.mid[2] + f;
    W[3] = j.mid[3] + g;
    W[4] = j.mid[4] + h;
    W[5] = j.mid[5] + a;
    W[6] = j.mid[6] + b;
    W[7] = j.mid[7] + c;
    // Second hash of the 32-byte digest: words 8..15 are padding constants.
    W[8] = 0x80000000u;
    W[9] = W[10] = W[11] = W[12] = W[13] = W[14] = 0;
    W[15] = 256;
#pragma unroll
    for (int i = 16; i < 61; i++) W[i] = s1(W[i - 2]) + W[i - 7] + s0(W[i - 15]) + W[i - 16];
    a = 0x6a09e667u; b = 0xbb67ae85u; c = 0x3c6ef372u; d = 0xa54ff53au;
    e = 0x510e527fu; f = 0x9b05688cu; g = 0x1f83d9abu; h = 0x5be0cd19u;
#pragma unroll
    for (int i = 0; i < 56; i += 8) {
        R8(i, W);
    }
    ROUND(a, b, c, d, e, f, g, h, K[56] + W[56]);
    ROUND(h, a, b, c, d, e, f, g, K[57] + W[57]);
    ROUND(g, h, a, b, c, d, e, f, K[58] + W[58]);
    ROUND(f, g, h, a, b, c, d, e, K[59] + W[59]);
    ROUND(e, f, g, h, a, b, c, d, K[60] + W[60]);
    // Round 60's call added T1 to `h`: that is e after round 60, which rounds 61..63 only
    // shift into the last state word. The digest's last word is IV[7] plus it.
    return BSWAP(0x5be0cd19u + h);
}

#if defined(__CUDACC__) || defined(IDLERIG_CPU_GRID)
// Scans nonces start + off for off in 0..=last: in wave k, thread t of the grid (t counted
// across blocks) tries offset k * threads + t. Block b runs waves resume[b] .. end_wave, so the
// host resumes every block from its own count after a pre-emption and no nonce is hashed
// twice or skipped. Candidates are appended to out[1..=cap], their count in out[0].
//
// Every `every` waves a block reaches a checkpoint, two barriers that hand one answer to all
// of its threads:
// - if any of its threads found the buffer full since the last checkpoint, the block stops
//   and reports the last checkpoint, so those waves are rescanned on the device (the host drops
//   their candidates that did fit, by wave, and finds them again on the rescan);
// - if the host-mapped `stop` word is raised (pre-emption, shutdown), the block stops there.
// progress[b] is the first wave block b has not finished.
// The stop word as each side must read it: on the GPU a volatile load of host-mapped memory
// (seen at the next read, with no copy); on the CPU stand-in an atomic acquire load, since the
// host writes it as a Rust AtomicU32 from another thread (a volatile load there is a data race).
#if defined(IDLERIG_CPU_GRID)
#define IDLERIG_STOP_RAISED(stop) (__atomic_load_n((stop), __ATOMIC_ACQUIRE) != 0)
#else
#define IDLERIG_STOP_RAISED(stop) (*(stop) != 0)
#endif

extern "C" __global__ void sha256d_scan(Job job, u32 start, u32 last, u32 end_wave,
                                        const u32* resume, u32 every, u32* out, u32 cap,
                                        const volatile u32* stop, u32* progress) {
    const u32 threads = gridDim.x * blockDim.x;
    const u32 tid = blockIdx.x * blockDim.x + threadIdx.x;
    u32 k = resume[blockIdx.x];
    u32 done = k;
    u32 until_check = 0;
    int lost = 0;
    for (;;) {
        if (until_check == 0 || k >= end_wave) {
            if (__syncthreads_or(lost)) break;
            done = k;
            if (k >= end_wave || __syncthreads_or(threadIdx.x == 0 && IDLERIG_STOP_RAISED(stop))) break;
            until_check = every;
        }
        until_check--;
        // 64-bit: the last wave may reach past the nonce space; those threads only idle.
        const unsigned long long off = (unsigned long long)k * threads + tid;
        if (off <= last) {
            const u32 nonce = start + (u32)off;
            if (sha256d_top(job, nonce) <= job.target_hi) {
                u32 slot = atomicAdd(&out[0], 1u);
                if (slot < cap) out[1 + slot] = nonce;
                else lost = 1;
            }
        }
        k++;
    }
    if (threadIdx.x == 0) progress[blockIdx.x] = done;
}
#endif
