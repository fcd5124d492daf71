// runtime.cc -- the CUDA simulator's runtime: runs one kernel launch on the CPU with CUDA's
// semantics and checks what a GPU would not.
//
// * Blocks run one after another; launches never overlap (one global lock).
// * The threads of a block are fibers (ucontext) on the calling OS thread, scheduled round-robin:
//   a thread runs until it blocks at a barrier or a warp operation, or exits. A barrier
//   completes when every thread of the block has reached it; a warp operation when every lane
//   of its mask has. So __syncthreads and the shuffles behave as on the GPU, and the schedule
//   is deterministic (the same launch runs the same way every time).
// * Every load and store of the kernel code reaches the __tsan_* callbacks below (the kernels
//   are compiled with -fsanitize=thread; this file is not, and stands in for libtsan). Each
//   access is checked before it happens:
//     - global memory: it must lie inside a buffer passed to the launch (or one reached through
//       a pointer table argument); a write must not go to a `const` parameter; the address must
//       be aligned to the access size. Else: an out-of-bounds report naming the kernel, the
//       block, the thread, the parameter and the index.
//     - global memory, races: a 2-byte granule two blocks of the launch touch, one writing (blocks are
//       never ordered), or two threads of a block between barriers; atomics excepted.
//     - shared memory: inside a __shared__ variable (variables are separated by red zones), or
//       inside the launch's dynamic shared memory; and no data race: a read or write of a word
//       that another thread wrote since the last __syncthreads, or a write of a word that
//       another thread read since then, is reported with both threads.
// * Asynchronous copies (`__pipeline_memcpy_async`, cuda_pipeline_primitives.h): the source is
//   read and checked when the copy is issued, the destination (shared memory) is checked as a
//   write of the issuing thread then and again when the data lands, which is at the
//   `__pipeline_wait_prior` that waits for its group (or the thread's exit). So a read of the
//   destination before the wait sees the old data, and a read by another thread that no
//   __syncthreads after the wait orders is a race.
// * A __syncthreads that some thread of the block never reaches (it exited, or waits at
//   another barrier) is reported, never a hang; so is a warp operation whose mask names a lane
//   that exited, and any deadlock (all remaining threads blocked).
// Shared-memory races are tracked per 4-byte word: two threads writing different bytes of one
// word between barriers are reported too, although they do not race (a known imprecision;
// CUDA kernels rarely share sub-word data between threads).
// The first error stops the launch (the access that caused it is not performed) and is
// returned to the caller as text.
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

extern "C" {
// Mirrors `SimLaunch` and `SimArg` in host/backend/sim.rs.
struct tsim_launch {
  unsigned grid[3];
  unsigned block[3];
  unsigned long long dyn_smem;
};
enum tsim_arg_kind : int { kArgInt = 0, kArgFloat = 1, kArgConstPtr = 2, kArgMutPtr = 3, kArgTable = 4 };
struct tsim_arg {
  int kind;
  float f;
  long long i;
  void* p;
  unsigned long long len;   // elements (pointers)
  unsigned long long elem;  // bytes per element (pointers)
  const char* name;
};
typedef void (*tsim_body)(const tsim_arg*);
}

namespace {

constexpr size_t kStaticSmem = 48 * 1024;    // CUDA's limit for static shared memory
constexpr size_t kStaticArena = 64 * 1024;   // with the red zones between variables
constexpr size_t kDynamicSmem = 227 * 1024;  // the most dynamic shared memory a block may have (sm_90)
constexpr size_t kArenaBytes = kStaticArena + kDynamicSmem;
constexpr size_t kRedZone = 64;
constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr int kMaxThreads = 1024;

alignas(256) unsigned char g_arena[kArenaBytes];

enum class St { Ready, AtBarrier, AtWarp, Exited };
enum WarpOp : int { kOpShflIdx = 0, kOpShflUp = 1, kOpShflDown = 2, kOpShflXor = 3, kOpBallot = 10, kOpAny = 11, kOpAll = 12, kOpSyncwarp = 20 };

// ---- fibers: a minimal context switch (x86-64), ucontext elsewhere -------------------------------
// swapcontext saves and restores the signal mask with a system call on every switch, which
// dominated the simulator's time; the x86-64 switch below saves only what the ABI asks a callee
// to keep (rbx, rbp, r12-r15, the stack pointer, MXCSR and the x87 control word).
#if defined(__x86_64__)
extern "C" void tsim_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl tsim_switch
.type tsim_switch,@function
tsim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size tsim_switch, .-tsim_switch
.section .note.GNU-stack,"",@progbits
.text
)");
struct Context {
  void* sp = nullptr;
};
#else
struct Context {
  ucontext_t uc;
};
#endif

// An asynchronous copy in flight: the bytes read at issue, written to `dst` when waited for.
struct PendingCopy {
  uintptr_t dst;
  unsigned char data[16];
  uint8_t size, fill;  // bytes written; of which the last `fill` are zeros
  uint32_t group;      // the commit group (the thread's commit count when it was issued)
  const char* file;    // where it was issued
  int line;
};

struct Fiber {
  Context ctx;
  std::vector<PendingCopy> copies;  // asynchronous copies not yet landed
  uint32_t commits = 0;             // __pipeline_commit calls so far
  char* stack_lo = nullptr;
  char* stack_hi = nullptr;
  uint3 tid;
  St st = St::Ready;
  const char* file = "";
  int line = 0;
  // warp operation in progress
  int op = 0;
  unsigned mask = 0;
  unsigned long long val = 0;
  int arg = 0;
  int width = 32;
  int pred = 0;
  unsigned long long result = 0;
};

// Lanes of one warp waiting at the same warp operation (same mask).
struct WarpGroup {
  unsigned mask;
  int op;
  const char* file;
  int line;
  int arrived;
  unsigned waiting;
};
struct Warp {
  unsigned exited = 0;
  std::vector<WarpGroup> groups;
};

struct Range {
  uintptr_t lo, hi;
  size_t elem;
  std::string name;
  bool writable;
  size_t region;  // the private copy (index into State::gregions) the range lies in
};

// Per-granule shadow of global memory (of the arguments' private copies) for races between
// threads of a launch: blocks are never ordered with each other (only atomics may share a
// granule between blocks); threads of one block are ordered by __syncthreads. A granule is 2
// bytes, the smallest element a kernel stores (bf16 and f16): two threads writing the halves of
// one 4-byte word do not race.
constexpr size_t kGGrain = 2;
struct GShadow {
  uint32_t wblock = 0;  // writer's block + 1 (0: not written in this launch)
  uint32_t wthread = 0, wepoch = 0;
  uint32_t rblock = 0;  // a reader's block + 1 (0: not read); ~0u: readers in several blocks
  uint32_t rthread = 0, repoch = 0;
  bool rmany = false;  // several readers in that block and epoch
  bool watomic = false;
};
struct GRegion {
  uintptr_t lo, hi;
  std::vector<GShadow> sh;
};

struct SharedVar {
  const void* tag;
  size_t off, size, elem;
  const char* name;
};

// Per-word shadow of shared memory for race tracking.
// Per-word shadow of shared memory for race tracking. Two accesses of different threads are
// ordered when a __syncthreads lies between them (the block epoch moved on), or when both are
// in one warp and a __syncwarp of that warp completed between them (its count moved on).
struct Shadow {
  uint32_t wepoch, rEpoch;      // block epoch of the last write / of the reads since
  int32_t writer, reader;       // linear thread ids; reader -2 = several
  uint32_t wsync, rsync;        // the warp's __syncwarp count at the write / the latest read
  int32_t rwarp;                // the readers' warp, or -2 if several warps read
  bool watomic;                 // the last write was an atomic
  bool wasync;                  // the last write was an asynchronous copy landing
  uint32_t inflight;            // linear id + 1 of the thread whose asynchronous copy into this
                                // word is in flight (0: none)
};

struct State {
  std::mutex launch_lock;
  // the launch
  const char* kernel = "";
  dim3 grid, block;
  uint3 bidx{0, 0, 0};
  size_t nthreads = 0;
  size_t dyn_bytes = 0;
  std::vector<Range> ranges;
  std::vector<GRegion> gregions;
  std::vector<SharedVar> svars;
  size_t static_top = 0;
  const tsim_arg* args = nullptr;
  tsim_body body = nullptr;
  // the block
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<uint32_t> warp_syncs;  // completed __syncwarp per warp, this block
  Fiber* cur = nullptr;
  Context sched;
  uint32_t epoch = 1;
  size_t waiting_bar = 0, exited = 0;
  const char* bar_file = "";
  int bar_line = 0;
  int bar_kind = -1;  // -1 plain, 0 count, 1 and, 2 or
  int bar_acc = 0;
  bool failed = false;
  std::string error;
  std::vector<size_t> inflight_words;  // shadow words marked in flight (cleared per block)
  const char* landing_file = nullptr;  // set while an asynchronous copy lands (for messages)
  int landing_line = 0;
  std::vector<char*> stacks;
  std::vector<Shadow> shadow = std::vector<Shadow>(kArenaBytes / 4);
};

State& S() {
  static State* s = new State();
  return *s;
}

void fiber_entry();

#if defined(__x86_64__)
[[noreturn]] void fiber_start() {
  fiber_entry();
  std::abort();  // fiber_entry ends by switching to the scheduler for good
}
void init_fiber(Fiber& f, char* lo, size_t size) {
  f.stack_lo = lo;
  f.stack_hi = lo + size;
  uintptr_t top = (uintptr_t)(lo + size) & ~uintptr_t(15);
  void** sp = (void**)top;
  *--sp = nullptr;                  // a null return address above fiber_start, for unwinders
  *--sp = (void*)&fiber_start;      // where the first switch "returns" to (16-aligned slot)
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
  --sp;
  uint32_t csr[2] = {0x1F80u, 0x037Fu};  // default MXCSR and x87 control word
  std::memcpy(sp, csr, 8);
  f.ctx.sp = sp;
}
void to_fiber(Fiber& f) { tsim_switch(&S().sched.sp, f.ctx.sp); }
void to_scheduler(Fiber* f) { tsim_switch(&f->ctx.sp, S().sched.sp); }
#else
void init_fiber(Fiber& f, char* lo, size_t size) {
  f.stack_lo = lo;
  f.stack_hi = lo + size;
  getcontext(&f.ctx.uc);
  f.ctx.uc.uc_stack.ss_sp = lo;
  f.ctx.uc.uc_stack.ss_size = size;
  f.ctx.uc.uc_link = &S().sched.uc;
  makecontext(&f.ctx.uc, fiber_entry, 0);
}
void to_fiber(Fiber& f) { swapcontext(&S().sched.uc, &f.ctx.uc); }
void to_scheduler(Fiber* f) { swapcontext(&f->ctx.uc, &S().sched.uc); }
#endif

// Live allocations of the simulated devices (for pointer tables): base -> bytes. Never
// destroyed: Rust threads may still free buffers while the process exits.
std::mutex& g_alloc_lock = *new std::mutex();
std::map<uintptr_t, size_t>& g_allocs = *new std::map<uintptr_t, size_t>();

const char* base_name(const char* f) {
  const char* s = std::strrchr(f, '/');
  return s ? s + 1 : f;
}

std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

std::string tid_str(uint3 t) { return fmt("(%u,%u,%u)", t.x, t.y, t.z); }

uint3 tid_of(size_t linear) {
  State& s = S();
  uint3 t;
  t.x = linear % s.block.x;
  t.y = (linear / s.block.x) % s.block.y;
  t.z = linear / (size_t(s.block.x) * s.block.y);
  return t;
}

size_t linear_of(const Fiber* f) { return size_t(f - S().fibers.data()); }

// Records the first error and leaves the fiber for the scheduler, which stops the launch.
[[noreturn]] void fail(const std::string& what) {
  State& s = S();
  if (!s.failed) {
    s.failed = true;
    std::string where = fmt("kernel %s, block (%u,%u,%u)", s.kernel, s.bidx.x, s.bidx.y, s.bidx.z);
    if (s.cur) where += ", thread " + tid_str(s.cur->tid);
    s.error = where + ": " + what;
    if (s.landing_file)
      s.error += fmt(" (the write is the landing of the asynchronous copy issued at %s:%d: a copy lands at the "
                     "__pipeline_wait_prior that waits for it, or at the thread's exit, and only a __syncthreads "
                     "after that wait makes it visible to other threads)",
                     base_name(s.landing_file), s.landing_line);
  }
  if (s.cur) to_scheduler(s.cur);
  // The scheduler never resumes a failed fiber; and fail() is only called from a fiber.
  std::fprintf(stderr, "tessera simulator: %s\n", s.error.c_str());
  std::abort();
}

void yield() { to_scheduler(S().cur); }

// ---- memory checks --------------------------------------------------------------------------------
std::string elem_ref(const Range& r, uintptr_t a) {
  long long off = (long long)(a - r.lo);
  if (a < r.lo) off = -(long long)(r.lo - a);
  long long idx = off >= 0 ? off / (long long)r.elem : -((-off + (long long)r.elem - 1) / (long long)r.elem);
  return fmt("%s[%lld] (%s holds %llu elements)", r.name.c_str(), idx, r.name.c_str(),
             (unsigned long long)((r.hi - r.lo) / r.elem));
}

void shared_access(uintptr_t a, size_t size, bool write, bool atomic);

uint32_t block_linear() {
  State& s = S();
  return s.bidx.x + s.grid.x * (s.bidx.y + s.grid.y * s.bidx.z);
}

std::string block_str(uint32_t linear) {
  State& s = S();
  return fmt("(%u,%u,%u)", linear % s.grid.x, (linear / s.grid.x) % s.grid.y, linear / (s.grid.x * s.grid.y));
}

void global_race(const Range& r, uintptr_t a, size_t size, bool write, bool atomic) {
  State& s = S();
  if (r.region >= s.gregions.size()) return;
  GRegion* g = &s.gregions[r.region];
  const uint32_t me = (uint32_t)linear_of(s.cur), blk = block_linear() + 1, ep = s.epoch;
  for (uintptr_t w = (a - g->lo) / kGGrain; w < (a - g->lo + size + kGGrain - 1) / kGGrain && w < g->sh.size(); ++w) {
    GShadow& sh = g->sh[w];
    const uintptr_t at = g->lo + w * kGGrain;
    // Another thread's write is ordered before this access only if it is in this block, an
    // earlier barrier interval (or both accesses are atomics).
    if (sh.wblock != 0 && !(sh.wblock == blk && sh.wthread == me) && !(atomic && sh.watomic) &&
        !(sh.wblock == blk && sh.wepoch != ep)) {
      fail(fmt("data race on %s: thread %s of block %s wrote it and thread %s of block %s %s it in the same "
               "launch with nothing ordering them (%s)",
               elem_ref(r, at).c_str(), tid_str(tid_of(sh.wthread)).c_str(), block_str(sh.wblock - 1).c_str(),
               tid_str(s.cur->tid).c_str(), block_str(blk - 1).c_str(), write ? "writes" : "reads",
               sh.wblock == blk ? "no __syncthreads between" : "blocks are not ordered"));
    }
    if (write) {
      const bool other_reader =
          sh.rblock != 0 && (sh.rblock != blk || ((sh.rmany || sh.rthread != me) && sh.repoch == ep));
      if (other_reader && !atomic) {
        fail(fmt("data race on %s: %s read it and thread %s of block %s writes it in the same launch with nothing "
                 "ordering them",
                 elem_ref(r, at).c_str(),
                 sh.rblock == ~0u ? "threads of other blocks"
                                  : fmt("thread %s of block %s", tid_str(tid_of(sh.rthread)).c_str(),
                                        block_str(sh.rblock - 1).c_str())
                                        .c_str(),
                 tid_str(s.cur->tid).c_str(), block_str(blk - 1).c_str()));
      }
      sh.wblock = blk;
      sh.wthread = me;
      sh.wepoch = ep;
      sh.watomic = atomic;
    } else if (!atomic) {
      if (sh.rblock == 0) {
        sh.rblock = blk;
        sh.rthread = me;
        sh.repoch = ep;
        sh.rmany = false;
      } else if (sh.rblock != blk) {
        sh.rblock = ~0u;
      } else if (sh.repoch != ep) {
        sh.rthread = me;
        sh.repoch = ep;
        sh.rmany = false;
      } else if (sh.rthread != me) {
        sh.rmany = true;
      }
    }
  }
}

// `aligned`: the compiler emitted the aligned form of the hook, so the access is one of its
// natural size, which a GPU requires to be aligned to it (up to 16 bytes). The unaligned and
// range hooks cover accesses the compiler split or could not prove aligned: no check there.
void check_access(const void* p, size_t size, bool write, bool aligned = true, bool atomic = false) {
  State& s = S();
  Fiber* f = s.cur;
  if (!f || s.failed) return;
  const uintptr_t a = (uintptr_t)p;
  const uintptr_t arena = (uintptr_t)g_arena;
  if (a >= arena && a < arena + kArenaBytes) {
    if (aligned && a % std::min<size_t>(size, 16) != 0)
      fail(fmt("misaligned %zu-byte %s of shared memory at byte offset %zu", size, write ? "write" : "read",
               size_t(a - arena)));
    // A word an asynchronous copy is still bringing in may not be touched by anyone, whatever
    // barriers came between (the copy lands at its thread's wait, not before).
    for (size_t w = (a - arena) / 4; w < (a - arena + size + 3) / 4; ++w) {
      const uint32_t owner = s.shadow[w].inflight;
      if (owner == 0) continue;
      const PendingCopy* c = nullptr;
      for (const PendingCopy& p : s.fibers[owner - 1].copies)
        if (w * 4 >= p.dst - arena && w * 4 < p.dst - arena + p.size) c = &p;
      std::string what = fmt("shared memory at byte offset %zu", size_t(a - arena));
      for (const SharedVar& v : s.svars)
        if (a - arena >= v.off && a - arena < v.off + v.size)
          what = fmt("shared %s[%zu]", v.name, (a - arena - v.off) / v.elem);
      const std::string issued = c ? fmt("issued at %s:%d", base_name(c->file), c->line) : std::string("issued");
      if (owner - 1 == linear_of(f))
        fail(fmt("%s of %s while this thread's asynchronous copy into it (%s) is in flight: wait for it first "
                 "(__pipeline_wait_prior)",
                 write ? "write" : "read", what.c_str(), issued.c_str()));
      fail(fmt("data race on %s: thread %s %s it while thread %s's asynchronous copy into it (%s) is in flight: "
               "the copy lands at that thread's __pipeline_wait_prior, and a __syncthreads after that wait must "
               "come before any other thread touches it",
               what.c_str(), tid_str(f->tid).c_str(), write ? "writes" : "reads", tid_str(tid_of(owner - 1)).c_str(),
               issued.c_str()));
    }
    shared_access(a, size, write, atomic);
    return;
  }
  // The fiber's own stack (local arrays the compiler keeps in memory).
  if (a >= (uintptr_t)f->stack_lo && a < (uintptr_t)f->stack_hi) return;
  const Range* best = nullptr;
  const Range* inside = nullptr;
  for (const Range& r : s.ranges) {
    if (a >= r.lo && a + size <= r.hi) {
      inside = &r;
      if (!write || r.writable) break;  // a write looks on for a writable argument over the same bytes
    }
  }
  if (inside) {
    const Range& r = *inside;
    if (write && !r.writable) fail(fmt("write to %s, which the kernel declares const", elem_ref(r, a).c_str()));
    if (aligned && a % std::min<size_t>(size, 16) != 0)
      fail(fmt("misaligned %zu-byte %s of %s (the address must be a multiple of %zu)", size, write ? "write" : "read",
               elem_ref(r, a).c_str(), std::min<size_t>(size, 16)));
    global_race(r, a, size, write, atomic);
    return;
  }
  // Out of bounds: name the nearest buffer.
  uintptr_t bestd = UINTPTR_MAX;
  for (const Range& r : s.ranges) {
    uintptr_t d = a >= r.lo ? (a >= r.hi ? a - r.hi : 0) : r.lo - a;
    if (d < bestd) {
      bestd = d;
      best = &r;
    }
  }
  if (best && bestd < (1u << 20))
    fail(fmt("out-of-bounds %s of %zu bytes: %s", write ? "write" : "read", size, elem_ref(*best, a).c_str()));
  fail(fmt("%s of %zu bytes at address %p, which is in no buffer passed to the kernel", write ? "write" : "read",
           size, p));
}

void shared_access(uintptr_t a, size_t size, bool write, bool atomic) {
  State& s = S();
  const size_t off = a - (uintptr_t)g_arena;
  const char* name = nullptr;
  size_t vbase = 0, velem = 4;
  if (off < kStaticArena) {
    for (const SharedVar& v : s.svars) {
      if (off >= v.off && off + size <= v.off + v.size) {
        name = v.name;
        vbase = v.off;
        velem = v.elem;
        break;
      }
    }
    if (!name) {
      const SharedVar* near = nullptr;
      size_t nd = SIZE_MAX;
      for (const SharedVar& v : s.svars) {
        size_t d = off >= v.off ? (off >= v.off + v.size ? off - (v.off + v.size) : 0) : v.off - off;
        if (d < nd) {
          nd = d;
          near = &v;
        }
      }
      if (near) {
        long long idx = ((long long)off - (long long)near->off) / (long long)near->elem;
        if (off < near->off) idx = -(((long long)near->off - (long long)off + (long long)near->elem - 1) / (long long)near->elem);
        fail(fmt("out-of-bounds %s of shared %s[%lld] (%s holds %zu elements)", write ? "write" : "read", near->name,
                 idx, near->name, near->size / near->elem));
      }
      fail(fmt("%s of shared memory at byte offset %zu, outside every __shared__ variable", write ? "write" : "read",
               off));
    }
  } else {
    const size_t d = off - kStaticArena;
    if (d + size > s.dyn_bytes)
      fail(fmt("out-of-bounds %s of dynamic shared memory at byte offset %zu: the launch has %zu bytes",
               write ? "write" : "read", d, s.dyn_bytes));
    name = "dynamic shared memory";
    vbase = kStaticArena;
  }
  // Race tracking, per 4-byte word.
  const int32_t me = (int32_t)linear_of(s.cur);
  const int32_t my_warp = me / 32;
  const uint32_t ep = s.epoch;
  const uint32_t my_sync = s.warp_syncs[my_warp];
  // Whether an access by thread `other` (warp sync count `at`) in this epoch is ordered before now.
  auto ordered = [&](int32_t other, uint32_t at) { return other / 32 == my_warp && my_sync > at; };
  for (size_t w = off / 4; w < (off + size + 3) / 4; ++w) {
    Shadow& sh = s.shadow[w];
    const long long idx = ((long long)w * 4 - (long long)vbase) / (long long)velem;
    const bool both_atomic = atomic && sh.watomic;
    if (sh.wepoch == ep && sh.writer != me && !both_atomic && !ordered(sh.writer, sh.wsync)) {
      fail(fmt("data race on shared %s[%lld]: thread %s wrote it and thread %s %s it with no __syncthreads "
               "between%s",
               name, idx, tid_str(tid_of(sh.writer)).c_str(), tid_str(s.cur->tid).c_str(),
               write ? "writes" : "reads",
               sh.wasync ? " (that write is the landing of an asynchronous copy: a copy lands at the "
                           "__pipeline_wait_prior that waits for it, or at the thread's exit, and only a "
                           "__syncthreads after that wait makes it visible to other threads)"
                         : ""));
    }
    if (write) {
      const bool readers_ordered = sh.rwarp == my_warp && my_sync > sh.rsync;
      if (sh.rEpoch == ep && sh.reader != me && !readers_ordered) {
        std::string who = sh.reader == -2 ? std::string("other threads") : "thread " + tid_str(tid_of(sh.reader));
        fail(fmt("data race on shared %s[%lld]: %s read it and thread %s writes it with no __syncthreads between",
                 name, idx, who.c_str(), tid_str(s.cur->tid).c_str()));
      }
      sh.wepoch = ep;
      sh.writer = me;
      sh.wsync = my_sync;
      sh.watomic = atomic;
      sh.wasync = s.landing_file != nullptr;
    } else {
      if (sh.rEpoch != ep) {
        sh.rEpoch = ep;
        sh.reader = me;
        sh.rwarp = my_warp;
        sh.rsync = my_sync;
      } else {
        if (sh.reader != me) sh.reader = -2;
        if (sh.rwarp != my_warp) sh.rwarp = -2;
        sh.rsync = std::max(sh.rsync, my_sync);
      }
    }
  }
}

// ---- barriers and warp operations -----------------------------------------------------------------
std::string site(const char* file, int line) { return fmt("%s:%d", base_name(file), line); }

const char* op_name(int op) {
  switch (op) {
    case kOpShflIdx: return "__shfl_sync";
    case kOpShflUp: return "__shfl_up_sync";
    case kOpShflDown: return "__shfl_down_sync";
    case kOpShflXor: return "__shfl_xor_sync";
    case kOpBallot: return "__ballot_sync";
    case kOpAny: return "__any_sync";
    case kOpAll: return "__all_sync";
    default: return "__syncwarp";
  }
}

int barrier(const char* file, int line, int kind, int pred) {
  State& s = S();
  Fiber* f = s.cur;
  if (s.exited > 0) {
    size_t ex = 0;
    while (s.fibers[ex].st != St::Exited) ++ex;
    fail(fmt("__syncthreads at %s is never reached by thread %s, which has exited: a barrier in a divergent "
             "branch (every thread of the block must reach it)",
             site(file, line).c_str(), tid_str(s.fibers[ex].tid).c_str()));
  }
  if (s.waiting_bar > 0 && (s.bar_line != line || std::strcmp(s.bar_file, file) != 0)) {
    size_t w = 0;
    while (s.fibers[w].st != St::AtBarrier) ++w;
    fail(fmt("divergent barriers: this thread reaches __syncthreads at %s while thread %s waits at %s",
             site(file, line).c_str(), tid_str(s.fibers[w].tid).c_str(), site(s.bar_file, s.bar_line).c_str()));
  }
  if (s.waiting_bar == 0) {
    s.bar_file = file;
    s.bar_line = line;
    s.bar_kind = kind;
    s.bar_acc = kind == 1 ? 1 : 0;
  }
  if (kind == 0) s.bar_acc += pred != 0;
  if (kind == 1) s.bar_acc = s.bar_acc && pred;
  if (kind == 2) s.bar_acc = s.bar_acc || pred;
  f->st = St::AtBarrier;
  f->file = file;
  f->line = line;
  if (++s.waiting_bar == s.nthreads) {
    for (Fiber& g : s.fibers) {
      g.st = St::Ready;
      g.result = (unsigned long long)s.bar_acc;
    }
    s.waiting_bar = 0;
    ++s.epoch;
  }
  yield();
  return (int)f->result;
}


unsigned long long warp_op(const char* file, int line, unsigned mask, int op, unsigned long long val, int arg,
                           int width, int pred) {
  State& s = S();
  Fiber* f = s.cur;
  const size_t me = linear_of(f);
  const size_t wi = me / 32, w0 = wi * 32;
  const unsigned lane = (unsigned)(me % 32);
  const size_t nlanes = std::min<size_t>(32, s.nthreads - w0);
  const unsigned valid = nlanes == 32 ? 0xffffffffu : ((1u << nlanes) - 1u);
  Warp& w = s.warps[wi];
  if (!((mask >> lane) & 1u))
    fail(fmt("%s at %s is called by lane %u, which is not in its mask 0x%08x", op_name(op), site(file, line).c_str(),
             lane, mask));
  if (op <= kOpShflXor && (width < 1 || width > 32 || (width & (width - 1)) != 0))
    fail(fmt("%s at %s: width %d is not a power of two in 1..32", op_name(op), site(file, line).c_str(), width));
  if (mask & ~valid)
    fail(fmt("%s at %s: mask 0x%08x names lane %d, which does not exist (the warp has %zu threads)", op_name(op),
             site(file, line).c_str(), mask, __builtin_ctz(mask & ~valid), nlanes));
  if (mask & w.exited) {
    const unsigned l = (unsigned)__builtin_ctz(mask & w.exited);
    fail(fmt("%s at %s: mask 0x%08x names lane %u (thread %s), which has exited", op_name(op),
             site(file, line).c_str(), mask, l, tid_str(s.fibers[w0 + l].tid).c_str()));
  }
  // The group of lanes this operation joins: the one waiting with the same mask. Since sm_70
  // lanes of one mask may meet at different call sites (independent thread scheduling), and
  // groups with other masks may wait side by side; a real mismatch ends in the deadlock report.
  WarpGroup* g = nullptr;
  for (WarpGroup& x : w.groups) {
    if (x.arrived == 0 || x.mask != mask) continue;
    if (x.op != op) {
      const unsigned l = (unsigned)__builtin_ctz(x.waiting);
      fail(fmt("divergent warp: lane %u reaches %s at %s while lane %u waits at %s at %s (mask 0x%08x)", lane,
               op_name(op), site(file, line).c_str(), l, op_name(x.op), site(x.file, x.line).c_str(), mask));
    }
    g = &x;
  }
  if (!g) {
    for (WarpGroup& x : w.groups)
      if (x.arrived == 0) g = &x;
    if (!g) {
      w.groups.push_back(WarpGroup{});
      g = &w.groups.back();
    }
    *g = WarpGroup{mask, op, file, line, 0, 0};
  }
  f->st = St::AtWarp;
  f->file = file;
  f->line = line;
  f->op = op;
  f->mask = mask;
  f->val = val;
  f->arg = arg;
  f->width = width;
  f->pred = pred;
  g->arrived++;
  g->waiting |= 1u << lane;
  if (g->arrived == __builtin_popcount(mask)) {
    unsigned ballot = 0;
    for (unsigned m = mask; m; m &= m - 1) {
      const unsigned l = (unsigned)__builtin_ctz(m);
      if (s.fibers[w0 + l].pred) ballot |= 1u << l;
    }
    for (unsigned m = mask; m; m &= m - 1) {
      const unsigned l = (unsigned)__builtin_ctz(m);
      Fiber& t = s.fibers[w0 + l];
      const unsigned wd = (unsigned)t.width, seg = l & ~(wd - 1), a = (unsigned)t.arg;
      unsigned src = l;
      switch (op) {
        case kOpShflIdx: src = seg + (a & (wd - 1)); break;
        case kOpShflUp: src = (l - seg) >= a ? l - a : l; break;
        case kOpShflDown: src = (l - seg) + a < wd ? l + a : l; break;
        case kOpShflXor: src = (l ^ a) <= seg + wd - 1 ? (l ^ a) : l; break;  // a later group: own value
        default: break;
      }
      if (op <= kOpShflXor) {
        if (src >= 32 || !((mask >> src) & 1u)) {
          s.cur = &t;
          fail(fmt("%s at %s: lane %u reads lane %u, which is not in the mask 0x%08x (its value is undefined)",
                   op_name(op), site(file, line).c_str(), l, src, mask));
        }
        t.result = s.fibers[w0 + src].val;
      } else if (op == kOpBallot) {
        t.result = ballot;
      } else if (op == kOpAny) {
        t.result = ballot != 0;
      } else if (op == kOpAll) {
        t.result = ballot == mask;
      }
      t.st = St::Ready;
    }
    g->arrived = 0;
    g->waiting = 0;
    if (op == kOpSyncwarp) ++s.warp_syncs[wi];  // orders the shared-memory accesses of its lanes
  }
  yield();
  return f->result;
}

// Lands the thread's asynchronous copies of groups below `upto` (the data becomes visible): a
// write of the issuing thread, checked for races like any other.
void land_copies(Fiber* f, uint32_t upto) {
  State& s = S();
  // In issue order: land the waited-for copies, keep the others (the in-flight markers, not
  // this list, say which words are still arriving).
  size_t kept = 0;
  for (size_t i = 0; i < f->copies.size(); ++i) {
    const PendingCopy c = f->copies[i];
    if (c.group >= upto) {
      f->copies[kept++] = c;
      continue;
    }
    const size_t off = c.dst - (uintptr_t)g_arena;
    for (size_t w = off / 4; w < (off + c.size + 3) / 4; ++w) s.shadow[w].inflight = 0;
    s.landing_file = c.file;
    s.landing_line = c.line;
    check_access((void*)c.dst, c.size, true, false);
    std::memcpy((void*)c.dst, c.data, c.size - c.fill);
    std::memset((void*)(c.dst + c.size - c.fill), 0, c.fill);
  }
  f->copies.resize(kept);
  s.landing_file = nullptr;
}

void on_exit() {
  State& s = S();
  Fiber* f = s.cur;
  // A GPU completes copies a thread never waited for; they land now.
  land_copies(f, UINT32_MAX);
  f->st = St::Exited;
  ++s.exited;
  if (s.waiting_bar > 0)
    fail(fmt("thread exits without reaching the __syncthreads at %s that %zu other threads wait at: a barrier in "
             "a divergent branch (every thread of the block must reach it)",
             site(s.bar_file, s.bar_line).c_str(), s.waiting_bar));
  const size_t me = linear_of(f);
  Warp& w = s.warps[me / 32];
  const unsigned bit = 1u << (me % 32);
  w.exited |= bit;
  for (const WarpGroup& g : w.groups)
    if (g.arrived > 0 && (g.mask & bit))
      fail(fmt("thread exits while lane %d waits for it at %s at %s (mask 0x%08x)", __builtin_ctz(g.waiting),
               op_name(g.op), site(g.file, g.line).c_str(), g.mask));
}

void fiber_entry() {
  State& s = S();
  s.body(s.args);
  on_exit();
#if defined(__x86_64__)
  to_scheduler(s.cur);  // never resumed
#endif
  // (ucontext: returns to the scheduler through uc_link)
}

char* stack_of(size_t i) {
  State& s = S();
  while (s.stacks.size() <= i) {
    void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    mprotect(m, kGuardBytes, PROT_NONE);  // a stack overflow faults instead of corrupting memory
    s.stacks.push_back((char*)m + kGuardBytes);
  }
  return s.stacks[i];
}

std::string deadlock_report() {
  State& s = S();
  std::string r = "deadlock: every remaining thread waits and none can proceed:";
  size_t shown = 0;
  for (const Fiber& f : s.fibers) {
    if (f.st == St::Exited || f.st == St::Ready) continue;
    if (shown++ == 4) {
      r += " ...";
      break;
    }
    if (f.st == St::AtBarrier)
      r += fmt(" thread %s at __syncthreads (%s);", tid_str(f.tid).c_str(), site(f.file, f.line).c_str());
    else
      r += fmt(" thread %s at %s (%s, mask 0x%08x);", tid_str(f.tid).c_str(), op_name(f.op),
               site(f.file, f.line).c_str(), f.mask);
  }
  return r;
}

bool run_block() {
  State& s = S();
  s.fibers.assign(s.nthreads, Fiber{});
  s.warps.resize((s.nthreads + 31) / 32);
  s.warp_syncs.assign(s.warps.size(), 0);
  for (Warp& w : s.warps) {
    w.exited = 0;
    w.groups.clear();
  }
  s.waiting_bar = 0;
  s.exited = 0;
  ++s.epoch;
  for (size_t w : s.inflight_words) s.shadow[w].inflight = 0;  // a failed block may leave some
  s.inflight_words.clear();
  // Shared memory starts each block as garbage: NaN bytes, so a kernel that reads before it
  // writes is loud.
  for (const SharedVar& v : s.svars) std::memset(g_arena + v.off, 0xff, v.size);
  if (s.dyn_bytes) std::memset(g_arena + kStaticArena, 0xff, s.dyn_bytes);
  for (size_t i = 0; i < s.nthreads; ++i) {
    Fiber& f = s.fibers[i];
    f.tid = tid_of(i);
    char* stack = stack_of(i);
    if (!stack) {
      s.failed = true;
      s.error = "cannot allocate fiber stacks";
      return false;
    }
    init_fiber(f, stack, kStackBytes);
  }
  for (;;) {
    bool ran = false;
    for (Fiber& f : s.fibers) {
      if (f.st != St::Ready) continue;
      s.cur = &f;
      to_fiber(f);
      s.cur = nullptr;
      ran = true;
      if (s.failed) return false;
    }
    if (s.exited == s.nthreads) return true;
    if (!ran) {
      s.failed = true;
      s.error = fmt("kernel %s, block (%u,%u,%u): %s", s.kernel, s.bidx.x, s.bidx.y, s.bidx.z,
                    deadlock_report().c_str());
      return false;
    }
  }
}

// ---- private copies of the arguments --------------------------------------------------------------
// A kernel runs on private copies of the buffers it is given, each with red zones around it,
// so that an access is checked against the argument it came through: an overrun of `w` that
// would land in `b` (two views of one allocation, as a model's parameters are) is reported,
// not accepted. Arguments that overlap (an output that aliases an input) share one copy, so
// aliasing behaves as on the GPU. Each copy keeps its address modulo 256, so the kernels take
// the same vectorised paths. Writable copies are copied back after the launch.
constexpr size_t kRedZoneGlobal = 256;

struct Interval {
  uintptr_t lo, hi;
  bool writable;
};

struct Region {
  uintptr_t lo, hi;
  bool writable;
  char* mem;
  uintptr_t copy;
};

struct Copies {
  std::vector<Region> regions;
  // Pointer-table entries rewritten in a copy: (where, original value), undone before copy-back.
  std::vector<std::pair<unsigned long long*, unsigned long long>> rewritten;
  // The region holding original address `p` (regions.size() if none).
  size_t index_of(uintptr_t p) const {
    for (size_t i = 0; i < regions.size(); ++i)
      if (p >= regions[i].lo && p < regions[i].hi) return i;
    for (size_t i = 0; i < regions.size(); ++i)  // an end pointer, or an empty buffer
      if (p == regions[i].hi) return i;
    return regions.size();
  }
  uintptr_t translate(uintptr_t p) const {
    const size_t i = index_of(p);
    return i < regions.size() ? regions[i].copy + (p - regions[i].lo) : p;
  }
  ~Copies() {
    for (Region& r : regions) std::free(r.mem);
  }
};

// The range a pointer-table entry may be read over: up to the end of its allocation.
bool table_entry_range(uintptr_t e, uintptr_t& hi) {
  std::lock_guard<std::mutex> g(g_alloc_lock);
  auto it = g_allocs.upper_bound(e);
  if (it == g_allocs.begin()) return false;
  --it;
  if (e >= it->first + it->second) return false;
  hi = it->first + it->second;
  return true;
}

bool make_copies(const tsim_arg* args, int nargs, Copies& c, std::vector<tsim_arg>& targs) {
  State& s = S();
  std::vector<Interval> iv;
  for (int i = 0; i < nargs; ++i) {
    const tsim_arg& a = args[i];
    if (a.kind < kArgConstPtr || a.p == nullptr) continue;
    const uintptr_t lo = (uintptr_t)a.p;
    iv.push_back(Interval{lo, lo + a.len * a.elem, a.kind == kArgMutPtr});
    if (a.kind == kArgTable) {
      const unsigned long long* t = (const unsigned long long*)a.p;
      for (unsigned long long k = 0; k < a.len; ++k) {
        uintptr_t hi;
        if (table_entry_range((uintptr_t)t[k], hi)) iv.push_back(Interval{(uintptr_t)t[k], hi, false});
      }
    }
  }
  std::sort(iv.begin(), iv.end(), [](const Interval& a, const Interval& b) { return a.lo < b.lo; });
  for (const Interval& x : iv) {
    if (!c.regions.empty() && (x.lo < c.regions.back().hi || x.lo == c.regions.back().lo)) {
      Region& r = c.regions.back();
      r.hi = std::max(r.hi, x.hi);
      r.writable = r.writable || x.writable;
    } else {
      c.regions.push_back(Region{x.lo, x.hi, x.writable, nullptr, 0});
    }
  }
  for (Region& r : c.regions) {
    const size_t bytes = r.hi - r.lo;
    r.mem = (char*)std::malloc(bytes + 2 * kRedZoneGlobal + 256);
    if (!r.mem) return false;
    const uintptr_t base = ((uintptr_t)r.mem + kRedZoneGlobal + 255) / 256 * 256;
    r.copy = base + (r.lo % 256);
    std::memcpy((void*)r.copy, (const void*)r.lo, bytes);
    s.gregions.push_back(GRegion{r.copy, r.copy + bytes, std::vector<GShadow>((bytes + kGGrain - 1) / kGGrain + 1)});
  }
  targs.assign(args, args + nargs);
  for (int i = 0; i < nargs; ++i) {
    tsim_arg& a = targs[i];
    if (a.kind < kArgConstPtr || a.p == nullptr) continue;
    const size_t region = c.index_of((uintptr_t)a.p);
    a.p = (void*)c.translate((uintptr_t)a.p);
    const uintptr_t lo = (uintptr_t)a.p;
    s.ranges.push_back(Range{lo, lo + a.len * a.elem, a.elem, a.name, a.kind == kArgMutPtr, region});
    if (a.kind == kArgTable) {
      // The table's copy points at the copies; each entry is readable to the end of its region.
      unsigned long long* t = (unsigned long long*)a.p;
      for (unsigned long long k = 0; k < a.len; ++k) {
        uintptr_t hi;
        if (!table_entry_range((uintptr_t)t[k], hi)) continue;
        const size_t region = c.index_of((uintptr_t)t[k]);
        const uintptr_t e = c.translate((uintptr_t)t[k]);
        s.ranges.push_back(Range{e, e + (hi - (uintptr_t)t[k]), 4, fmt("%s[%llu]", a.name, k), false, region});
        c.rewritten.emplace_back(&t[k], t[k]);
        t[k] = e;
      }
    }
  }
  return true;
}

void copy_back(const Copies& c) {
  for (const auto& [where, value] : c.rewritten) *where = value;
  for (const Region& r : c.regions)
    if (r.writable) std::memcpy((void*)r.lo, (const void*)r.copy, r.hi - r.lo);
}

}  // namespace

// ---- the C interface --------------------------------------------------------------------------------
extern "C" {

uint3 tsim_thread_idx() { return S().cur->tid; }
uint3 tsim_block_idx() { return S().bidx; }
dim3 tsim_block_dim() { return S().block; }
dim3 tsim_grid_dim() { return S().grid; }

void tsim_syncthreads(const char* file, int line) { barrier(file, line, -1, 0); }
int tsim_syncthreads_reduce(const char* file, int line, int kind, int pred) { return barrier(file, line, kind, pred); }
void tsim_syncwarp(const char* file, int line, unsigned mask) { warp_op(file, line, mask, kOpSyncwarp, 0, 0, 32, 0); }
unsigned long long tsim_shfl(const char* file, int line, unsigned mask, unsigned long long bits, int kind, int arg,
                             int width) {
  return warp_op(file, line, mask, kind, bits, arg, width, 0);
}
unsigned tsim_vote(const char* file, int line, unsigned mask, int kind, int pred) {
  return (unsigned)warp_op(file, line, mask, kOpBallot + kind, 0, 0, 32, pred);
}
void* tsim_dynamic_smem() { return g_arena + kStaticArena; }

void tsim_pipeline_memcpy_async(const char* file, int line, void* dst, const void* src, size_t size, size_t zfill) {
  State& s = S();
  Fiber* f = s.cur;
  if (!f || s.failed) return;
  const uintptr_t d = (uintptr_t)dst, a = (uintptr_t)src;
  if (size != 4 && size != 8 && size != 16)
    fail(fmt("__pipeline_memcpy_async at %s copies %zu bytes (it copies 4, 8 or 16)", site(file, line).c_str(), size));
  if (zfill > size)
    fail(fmt("__pipeline_memcpy_async at %s zero-fills %zu of %zu bytes", site(file, line).c_str(), zfill, size));
  if (d < (uintptr_t)g_arena || d + size > (uintptr_t)g_arena + kArenaBytes)
    fail(fmt("__pipeline_memcpy_async at %s: the destination %p is not shared memory", site(file, line).c_str(), dst));
  if (d % size != 0 || a % size != 0)
    fail(fmt("__pipeline_memcpy_async at %s: a %zu-byte copy needs %zu-byte aligned addresses (source %p, shared "
             "offset %zu)",
             site(file, line).c_str(), size, size, src, size_t(d - (uintptr_t)g_arena)));
  if ((a >= (uintptr_t)g_arena && a < (uintptr_t)g_arena + kArenaBytes) ||
      (a >= (uintptr_t)f->stack_lo && a < (uintptr_t)f->stack_hi))
    fail(fmt("__pipeline_memcpy_async at %s: the source %p is not global memory (cp.async copies global -> shared)",
             site(file, line).c_str(), src));
  const size_t n = size - zfill;
  if (n > 0) check_access(src, n, false, false);  // the source is read now
  check_access(dst, size, true, false);           // and the destination is being written from now on
  PendingCopy c{};
  c.dst = d;
  if (n > 0) std::memcpy(c.data, src, n);
  c.size = (uint8_t)size;
  c.fill = (uint8_t)zfill;
  c.group = f->commits;
  c.file = file;
  c.line = line;
  f->copies.push_back(c);
  const uint32_t me = uint32_t(linear_of(f)) + 1;
  for (size_t w = (d - (uintptr_t)g_arena) / 4; w < (d - (uintptr_t)g_arena + size + 3) / 4; ++w) {
    s.shadow[w].inflight = me;
    s.inflight_words.push_back(w);
  }
}
void tsim_pipeline_commit() {
  if (Fiber* f = S().cur) ++f->commits;
}
void tsim_pipeline_wait_prior(size_t prior) {
  Fiber* f = S().cur;
  if (!f || S().failed) return;
  // Every committed group but the newest `prior` has landed when this returns. CUDA's header
  // waits for at most 8 pending groups (a larger `prior` counts as 8).
  prior = std::min<size_t>(prior, 8);
  if (f->commits > prior) land_copies(f, uint32_t(f->commits - prior));
}

void* tsim_shared(const void* tag, size_t size, size_t align, size_t elem, const char* name) {
  State& s = S();
  for (const SharedVar& v : s.svars)
    if (v.tag == tag) return g_arena + v.off;
  size_t off = (s.static_top + kRedZone + align - 1) / align * align;
  size_t used = 0;
  for (const SharedVar& v : s.svars) used += v.size;
  if (used + size > kStaticSmem || off + size > kStaticArena)
    fail(fmt("__shared__ %s (%zu bytes) takes the block's static shared memory past CUDA's %zu bytes", name, size,
             kStaticSmem));
  s.svars.push_back(SharedVar{tag, off, size, elem ? elem : 1, name});
  s.static_top = off + size;
  std::memset(g_arena + off, 0xff, size);
  return g_arena + off;
}

#define TSIM_ATOMIC(name, T, body)  \
  T name(T* p, T v) {               \
    check_access(p, sizeof(T), true, true, true); \
    T old = *p;                     \
    body;                           \
    return old;                     \
  }
TSIM_ATOMIC(tsim_atomic_add_i32, int, *p = (int)((unsigned)old + (unsigned)v))
TSIM_ATOMIC(tsim_atomic_add_u32, unsigned, *p = old + v)
TSIM_ATOMIC(tsim_atomic_add_f32, float, *p = old + v)
TSIM_ATOMIC(tsim_atomic_exch_i32, int, *p = v)
TSIM_ATOMIC(tsim_atomic_exch_f32, float, *p = v)
TSIM_ATOMIC(tsim_atomic_max_i32, int, *p = std::max(old, v))
TSIM_ATOMIC(tsim_atomic_min_i32, int, *p = std::min(old, v))
int tsim_atomic_cas_i32(int* p, int cmp, int val) {
  check_access(p, 4, true, true, true);
  int old = *p;
  if (old == cmp) *p = val;
  return old;
}
unsigned long long tsim_atomic_cas_u64(unsigned long long* p, unsigned long long cmp, unsigned long long val) {
  check_access(p, 8, true, true, true);
  unsigned long long old = *p;
  if (old == cmp) *p = val;
  return old;
}
void tsim_trap(const char* file, int line) { fail(fmt("__trap() at %s", site(file, line).c_str())); }

void tsim_register_alloc(const void* p, size_t bytes) {
  std::lock_guard<std::mutex> g(g_alloc_lock);
  g_allocs[(uintptr_t)p] = bytes;
}
void tsim_unregister_alloc(const void* p) {
  std::lock_guard<std::mutex> g(g_alloc_lock);
  g_allocs.erase((uintptr_t)p);
}

// Runs one launch. Returns 0, or 1 with the report in `err`.
int tsim_launch_kernel(const char* kernel, int max_threads, const tsim_launch* l, const tsim_arg* args, int nargs,
                       tsim_body body, char* err, size_t errlen) {
  State& s = S();
  std::lock_guard<std::mutex> guard(s.launch_lock);
  s.kernel = kernel;
  s.grid = dim3{l->grid[0], l->grid[1], l->grid[2]};
  s.block = dim3{l->block[0], l->block[1], l->block[2]};
  s.nthreads = size_t(s.block.x) * s.block.y * s.block.z;
  s.dyn_bytes = l->dyn_smem;
  s.failed = false;
  s.error.clear();
  s.cur = nullptr;
  s.svars.clear();
  s.static_top = 0;
  s.ranges.clear();
  s.gregions.clear();
  auto refuse = [&](const std::string& why) {
    std::snprintf(err, errlen, "kernel %s: invalid launch: %s", kernel, why.c_str());
    return 1;
  };
  if (s.grid.x == 0 || s.grid.y == 0 || s.grid.z == 0 || s.nthreads == 0)
    return refuse(fmt("grid (%u,%u,%u) and block (%u,%u,%u) must be non-zero", s.grid.x, s.grid.y, s.grid.z,
                      s.block.x, s.block.y, s.block.z));
  if (s.grid.y > 65535 || s.grid.z > 65535)
    return refuse(fmt("grid (%u,%u,%u): y and z must be at most 65535", s.grid.x, s.grid.y, s.grid.z));
  if (s.nthreads > kMaxThreads || s.block.z > 64)
    return refuse(fmt("block (%u,%u,%u) has %zu threads; at most 1024 (and z <= 64)", s.block.x, s.block.y,
                      s.block.z, s.nthreads));
  if (max_threads > 0 && s.nthreads > (size_t)max_threads)
    return refuse(fmt("block of %zu threads exceeds the kernel's __launch_bounds__(%d)", s.nthreads, max_threads));
  if (s.dyn_bytes > kDynamicSmem)
    return refuse(fmt("%zu bytes of dynamic shared memory; at most %zu", s.dyn_bytes, kDynamicSmem));
  Copies copies;
  std::vector<tsim_arg> targs;
  if (!make_copies(args, nargs, copies, targs)) return refuse("out of host memory for the arguments' copies");
  s.args = targs.data();
  s.body = body;
  bool ok = true;
  for (unsigned z = 0; ok && z < s.grid.z; ++z)
    for (unsigned y = 0; ok && y < s.grid.y; ++y)
      for (unsigned x = 0; ok && x < s.grid.x; ++x) {
        s.bidx = uint3{x, y, z};
        ok = run_block();
      }
  s.cur = nullptr;
  s.fibers.clear();
  s.ranges.clear();
  s.gregions.clear();
  // What the kernel wrote before any error reaches the caller's buffers, as on a GPU.
  copy_back(copies);
  if (!ok) {
    std::snprintf(err, errlen, "%s", s.error.c_str());
    return 1;
  }
  return 0;
}

// ---- the compiler's instrumentation hooks (in place of libtsan) ------------------------------------
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_ignore_thread_begin() {}
void __tsan_ignore_thread_end() {}
void __tsan_vptr_read(void**) {}
void __tsan_vptr_update(void**, void*) {}
#define TSIM_HOOKS(n)                                                         \
  void __tsan_read##n(void* p) { check_access(p, n, false); }                 \
  void __tsan_write##n(void* p) { check_access(p, n, true); }                 \
  void __tsan_unaligned_read##n(void* p) { check_access(p, n, false, false); } \
  void __tsan_unaligned_write##n(void* p) { check_access(p, n, true, false); } \
  void __tsan_volatile_read##n(void* p) { check_access(p, n, false); }        \
  void __tsan_volatile_write##n(void* p) { check_access(p, n, true); }        \
  void __tsan_unaligned_volatile_read##n(void* p) { check_access(p, n, false, false); } \
  void __tsan_unaligned_volatile_write##n(void* p) { check_access(p, n, true, false); }
TSIM_HOOKS(1)
TSIM_HOOKS(2)
TSIM_HOOKS(4)
TSIM_HOOKS(8)
TSIM_HOOKS(16)
void __tsan_read_range(void* p, unsigned long n) {
  for (unsigned long i = 0; i < n; i += 4) check_access((char*)p + i, std::min(4ul, n - i), false, false);
}
void __tsan_write_range(void* p, unsigned long n) {
  for (unsigned long i = 0; i < n; i += 4) check_access((char*)p + i, std::min(4ul, n - i), true, false);
}
// clang instruments memset, memcpy and memmove as calls to these (gcc instruments the bytes):
// the ranges are checked, then the operation done.
void* __tsan_memset(void* p, int c, unsigned long n) {
  __tsan_write_range(p, n);
  return memset(p, c, n);
}
void* __tsan_memcpy(void* d, const void* s, unsigned long n) {
  __tsan_read_range(const_cast<void*>(s), n);
  __tsan_write_range(d, n);
  return memcpy(d, s, n);
}
void* __tsan_memmove(void* d, const void* s, unsigned long n) {
  __tsan_read_range(const_cast<void*>(s), n);
  __tsan_write_range(d, n);
  return memmove(d, s, n);
}
// Fences: every access is already ordered here (one thread runs at a time).
void __tsan_atomic_thread_fence(int) {}
void __tsan_atomic_signal_fence(int) {}

}  // extern "C"
