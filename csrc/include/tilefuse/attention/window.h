// SPDX-License-Identifier: Apache-2.0
// Index math of neighborhood attention (NATTEN 0.21 semantics) and of Swin shifted windows,
// written once for the CPU loop, the CUDA kernels and the debug op.
//
// Every function works on one axis; a multi-dimensional window is the product of the per-axis
// intervals (so the set of keys a query sees is always a box, and the union of the boxes of a
// box of queries is again a box: both facts are what makes spatial tiles cheap to enumerate).
// Both window ends are non-decreasing functions of the query coordinate; the tilers rely on it.
#pragma once
#include "tilefuse/attention/mask.h"
#include "tilefuse/common.h"

namespace tilefuse {

/// \brief Length of dilation group g (coordinates g, g + d, g + 2d, ...) of an axis of length L.
TF_HD index_t dilation_group_length(index_t L, index_t d, index_t g) { return (L - g + d - 1) / d; }

/// \brief Neighborhood window [start, end) of query i on an axis of length L, in the
/// coordinates of its dilation group (L is the group's length).
/// Non-causal: the stride-group leader is the centre query of the group (right of centre for
/// even strides), clamped to the last query; the window is centred on the leader, k/2 keys to
/// the left and k/2 - (1 - k%2) to the right (even k: one fewer right), and shifted inward at
/// the borders so that it always holds exactly k keys. Causal: the leader is the last query
/// of the stride group; the window ends at the query itself and starts k-1 before the leader.
/// stride == k gives blocked (non-overlapping) windows. Requires 1 <= s <= k <= L.
TF_HD void na_window(index_t i, index_t L, index_t k, index_t s, bool causal, index_t& start,
                     index_t& end) {
  if (causal) {
    const index_t leader = imin((i / s) * s + s - 1, L - 1);
    start = imax(0, leader - k + 1);
    end = i + 1;
    return;
  }
  const index_t left = k / 2, right = k / 2 + (k % 2) - 1;
  const index_t leader = imin((i / s) * s + s / 2, L - 1);
  const index_t center = imax(left, imin(leader, L - 1 - right));
  start = center - left;
  end = center + right + 1;
}

/// \brief Swin window [start, end) of position y on an axis padded to Lp (a multiple of W):
/// the cyclic roll by -shift, the partition into windows of W and the shifted-window region
/// mask together keep exactly the keys of the non-cyclic window with boundaries at
/// shift + m W, cut at 0 and Lp. Positions in [L, Lp) are the padding (pad_kv) keys.
TF_HD void swin_window(index_t y, index_t Lp, index_t W, index_t shift, index_t& start,
                       index_t& end) {
  const index_t g = (y + W - shift) / W;  // shift < W, so this is >= 0
  start = imax(0, g * W + shift - W);
  end = imin(Lp, g * W + shift);
}

/// \brief Tile of disjoint windows (Swin, blocked NA): one whole window where it fits (a window
/// sees only itself), outer axes halved first until the tile holds at most cap tokens.
TF_HD void fit_window_tile(const index_t* window, index_t cap, index_t* tile) {
  for (int ax = 0; ax < 3; ++ax) tile[ax] = window[ax];
  for (int ax = 0; ax < 3; ++ax)
    while (tile[0] * tile[1] * tile[2] > cap && tile[ax] > 1) tile[ax] = (tile[ax] + 1) / 2;
}

/// \brief Partition of one axis [0, L) into tiles that respect window boundaries.
/// Boundaries at phase + m * period (period 0: none) cut the axis into segments; a segment
/// longer than `maxlen` is split into ceil(len / maxlen) near-equal pieces. When `merge` is
/// set, `period` is first widened to the largest multiple of itself that fits in `maxlen`
/// (overlapping windows: several stride groups per tile; disjoint windows keep merge off so
/// that a tile never straddles two windows).
struct AxisTiling {
  index_t L = 1, phase = 0, period = 0, maxlen = 1;

  TF_HD static AxisTiling make(index_t L, index_t phase, index_t period, index_t maxlen,
                               bool merge) {
    AxisTiling t;
    t.L = L;
    t.maxlen = imax(1, maxlen);
    if (period <= 0) {  // no boundary inside the axis
      t.period = L > 0 ? L : 1;
      t.phase = 0;
      return t;
    }
    if (merge && period < t.maxlen) period = (t.maxlen / period) * period;
    t.period = period;
    t.phase = phase % period;
    return t;
  }
  TF_HD index_t pieces(index_t len) const { return len <= 0 ? 0 : ceil_div(len, maxlen); }
  // Segments: [0, phase) if phase > 0, then [phase + m period, ...) up to L.
  TF_HD index_t first_len() const { return imin(phase, L); }
  TF_HD index_t count() const {
    const index_t rest = L - first_len();
    const index_t full = rest / period, tail = rest % period;
    return pieces(first_len()) + full * pieces(period) + pieces(tail);
  }
  /// Tile t -> [lo, hi).
  TF_HD void tile(index_t t, index_t& lo, index_t& hi) const {
    index_t seg_lo = 0, seg_len = first_len();
    const index_t p0 = pieces(seg_len);
    if (t >= p0) {
      t -= p0;
      const index_t pp = pieces(period);
      const index_t m = t / pp;
      t -= m * pp;
      seg_lo = first_len() + m * period;
      seg_len = imin(period, L - seg_lo);
    }
    const index_t n = pieces(seg_len);
    // Near-equal pieces: the first (seg_len % n) pieces get one more element.
    const index_t base = seg_len / n, extra = seg_len % n;
    lo = seg_lo + t * base + imin(t, extra);
    hi = lo + base + (t < extra ? 1 : 0);
  }
};

/// \brief A box [lo, hi) in a grid of rank 3 (lower ranks use leading axes of extent 1);
/// its tokens are ordered row-major (the last axis fastest).
struct Box {
  index_t lo[3], hi[3];
  TF_HD index_t extent(int a) const { return hi[a] - lo[a]; }
  TF_HD index_t size() const { return extent(0) * extent(1) * extent(2); }
};

/// \brief Splits a box into near-equal sub-boxes of at most `cap` tokens, cutting the
/// outermost axes first so that rows along the last axis stay whole where possible.
struct BoxSplit {
  Box box;
  index_t n[3];  // pieces per axis
  TF_HD static BoxSplit make(const Box& b, index_t cap) {
    BoxSplit s{b, {1, 1, 1}};
    const index_t w0 = b.extent(0), w1 = b.extent(1), w2 = b.extent(2);
    if (w2 > cap) {
      s.n[0] = w0;
      s.n[1] = w1;
      s.n[2] = ceil_div(w2, cap);
    } else if (w1 * w2 > cap) {
      s.n[0] = w0;
      s.n[1] = ceil_div(w1, cap / w2);
    } else {
      s.n[0] = ceil_div(w0, cap / (w1 * w2));
    }
    return s;
  }
  TF_HD index_t count() const { return n[0] * n[1] * n[2]; }
  TF_HD Box piece(index_t t) const {
    Box r;
    index_t idx[3];
    idx[2] = t % n[2];
    idx[1] = (t / n[2]) % n[1];
    idx[0] = t / (n[1] * n[2]);
    for (int a = 0; a < 3; ++a) {
      const index_t w = box.extent(a), base = w / n[a], extra = w % n[a], i = idx[a];
      r.lo[a] = box.lo[a] + i * base + imin(i, extra);
      r.hi[a] = r.lo[a] + base + (i < extra ? 1 : 0);
    }
    return r;
  }
};

/// \brief Mask policy of neighborhood attention and Swin windows for the tiled main loop.
/// Each query sees a box of keys (the product of its per-axis windows). One policy object
/// describes one sequence of the loop: a batch element, or with dilation one dilation group of
/// it (the adapter reorders tokens so that group g of batch element b is sequence b * G + g,
/// row-major over the group's own grid; NA inside a group is NA without dilation).
/// Grids have rank 3; lower ranks use leading axes of extent 1.
struct WindowMask {
  enum Kind : int { kNeighborhood = 0, kSwin = 1 };
  struct Args {
    int kind = kNeighborhood;
    index_t size[3] = {1, 1, 1};      // spatial extent per axis (before any dilation split)
    index_t dilation[3] = {1, 1, 1};  // NA
    index_t kernel[3] = {1, 1, 1};    // NA
    index_t stride[3] = {1, 1, 1};    // NA
    bool causal[3] = {false, false, false};
    index_t window[3] = {1, 1, 1};  // Swin
    index_t shift[3] = {0, 0, 0};   // Swin, 0 <= shift < window
    index_t q_tile[3] = {1, 1, 64};   // longest query tile per axis (product <= loop's BQ)
    index_t k_tile[3] = {1, 1, 128};  // longest key tile per axis (backward; product <= BK)
  };

  int kind;
  index_t n[3];   // extent of this sequence's grid (queries and real keys)
  index_t np[3];  // extent of the key grid: n, or for Swin n padded to a multiple of W
  index_t k[3], s[3], W[3], shift[3];
  bool causal[3];
  AxisTiling qt[3], kt[3];

  TF_HD static WindowMask make(const Args& a, index_t b) {
    WindowMask m;
    m.kind = a.kind;
    const index_t G = a.dilation[0] * a.dilation[1] * a.dilation[2];
    index_t g = b % G;
    for (int ax = 2; ax >= 0; --ax) {
      const index_t d = a.dilation[ax], gi = g % d;
      g /= d;
      m.n[ax] = dilation_group_length(a.size[ax], d, gi);
    }
    for (int ax = 0; ax < 3; ++ax) {
      m.k[ax] = a.kernel[ax];
      m.s[ax] = a.stride[ax];
      m.causal[ax] = a.causal[ax];
      m.W[ax] = a.window[ax];
      m.shift[ax] = a.shift[ax];
      index_t phase = 0, period = 0;
      bool merge = true;
      if (a.kind == kSwin) {
        m.np[ax] = round_up(m.n[ax], m.W[ax]);
        phase = m.shift[ax];
        period = m.W[ax];
        merge = false;
      } else {
        m.np[ax] = m.n[ax];
        period = m.s[ax] > 1 ? m.s[ax] : 0;
        merge = m.s[ax] < m.k[ax];  // blocked windows are disjoint: one group per tile
      }
      m.qt[ax] = AxisTiling::make(m.n[ax], phase, period, a.q_tile[ax], merge);
      m.kt[ax] = AxisTiling::make(m.np[ax], phase, period, a.k_tile[ax], merge);
    }
    return m;
  }

  /// Keys [lo, hi) on axis ax seen by the query at coordinate x.
  TF_HD void window(int ax, index_t x, index_t& lo, index_t& hi) const {
    if (kind == kSwin)
      swin_window(x, np[ax], W[ax], shift[ax], lo, hi);
    else
      na_window(x, n[ax], k[ax], s[ax], causal[ax], lo, hi);
  }
  /// Offset added to (key - query) to index the canonical bias table of extent 2r + 1 per axis.
  TF_HD index_t bias_offset(int ax) const { return kind == kSwin ? W[ax] - 1 : k[ax] - 1; }

  TF_HD index_t num_query_tiles() const { return qt[0].count() * qt[1].count() * qt[2].count(); }
  TF_HD index_t num_key_tiles() const { return kt[0].count() * kt[1].count() * kt[2].count(); }
  TF_HD static Box grid_tile(const AxisTiling* t, index_t i) {
    Box b;
    const index_t c2 = t[2].count(), c1 = t[1].count();
    t[2].tile(i % c2, b.lo[2], b.hi[2]);
    t[1].tile((i / c2) % c1, b.lo[1], b.hi[1]);
    t[0].tile(i / (c1 * c2), b.lo[0], b.hi[0]);
    return b;
  }
  TF_HD Box query_tile(index_t i) const { return grid_tile(qt, i); }
  TF_HD Box key_tile(index_t i) const { return grid_tile(kt, i); }

  /// Keys seen by any query of the box q (windows are monotone, so a box again).
  TF_HD Box key_union(const Box& q) const {
    Box r;
    for (int ax = 0; ax < 3; ++ax) {
      index_t lo, hi, lo2, hi2;
      window(ax, q.lo[ax], lo, hi);
      window(ax, q.hi[ax] - 1, lo2, hi2);
      r.lo[ax] = lo;
      r.hi[ax] = hi2;
    }
    return r;
  }
  /// Queries whose window meets the key box kb (binary searches on the monotone ends).
  /// Returns false when there is none.
  TF_HD bool query_union(const Box& kb, Box& r) const {
    for (int ax = 0; ax < 3; ++ax) {
      index_t a = 0, b = n[ax];  // first x with window_hi(x) > kb.lo
      while (a < b) {
        const index_t mid = (a + b) / 2;
        index_t lo, hi;
        window(ax, mid, lo, hi);
        if (hi > kb.lo[ax]) b = mid; else a = mid + 1;
      }
      r.lo[ax] = a;
      a = r.lo[ax];
      b = n[ax];  // first x with window_lo(x) >= kb.hi
      while (a < b) {
        const index_t mid = (a + b) / 2;
        index_t lo, hi;
        window(ax, mid, lo, hi);
        if (lo >= kb.hi[ax]) b = mid; else a = mid + 1;
      }
      r.hi[ax] = a;
      if (r.hi[ax] <= r.lo[ax]) return false;
    }
    return true;
  }
  /// kTileFull when every query of q sees every key of kb, else kTilePartial (callers only
  /// pair boxes that meet, and a sub-box of a key union always meets: the union of product
  /// windows over a product of queries is the product of the per-axis unions).
  TF_HD int tile(const Box& q, const Box& kb) const {
    for (int ax = 0; ax < 3; ++ax) {
      index_t lo, hi, lo2, hi2;
      window(ax, q.hi[ax] - 1, lo, hi);  // the largest start
      window(ax, q.lo[ax], lo2, hi2);    // the smallest end
      if (lo > kb.lo[ax] || hi2 < kb.hi[ax]) return kTilePartial;
    }
    return kTileFull;
  }
  /// Sequence-local token index of a grid position (keys past n are padding: -1).
  TF_HD index_t token(index_t c0, index_t c1, index_t c2) const {
    if (c0 >= n[0] || c1 >= n[1] || c2 >= n[2]) return -1;
    return (c0 * n[1] + c1) * n[2] + c2;
  }
};

/// True when the windows tile the grid without overlap (Swin; NA with stride == kernel on every
/// axis, whose windows the callers store in Args::window): the tilers then keep one window per
/// tile where it fits (fit_window_tile).
TF_HD bool disjoint_windows(const WindowMask::Args& a) {
  if (a.kind == WindowMask::kSwin) return true;
  for (int ax = 0; ax < 3; ++ax)
    if (a.stride[ax] != a.kernel[ax]) return false;
  return true;
}

}  // namespace tilefuse
