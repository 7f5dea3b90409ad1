// SPDX-License-Identifier: Apache-2.0
// Mask policies of the tiled attention main loop.
//
// A policy is built per sequence (Policy::make(args, Sq, Sk)) and answers, in sequence-local
// indices (query i in [0, Sq), key j in [0, Sk)):
//   key_range(q0, q1, k0, k1)    keys [k0, k1) that some query in [q0, q1) may see
//   query_range(k0, k1, q0, q1)  queries [q0, q1) that may see some key in [k0, k1) (backward)
//   tile(q0, q1, k0, k1)         kTileSkip, kTileFull (no element masked) or kTilePartial
//   allowed(i, j)                element test, only evaluated inside partial tiles
//   row_interval(i, j0, j1)      optional fast path: narrows [j0, j1) to the visible keys of
//                                row i when they are one interval (band masks); policies whose
//                                rows are not intervals omit it and get the element test
// The main loop handles the ragged end (keys >= Sk) itself; policies need not.
#pragma once
#include <utility>

#include "tilefuse/common.h"

namespace tilefuse {

enum TileState : int { kTileSkip = 0, kTileFull = 1, kTilePartial = 2 };

/// \brief No mask: every query sees every key.
struct DenseMask {
  struct Args {};
  index_t Sq, Sk;
  TF_HD static DenseMask make(const Args&, index_t Sq, index_t Sk) { return {Sq, Sk}; }
  TF_HD void key_range(index_t, index_t, index_t& k0, index_t& k1) const { k0 = 0; k1 = Sk; }
  TF_HD void query_range(index_t, index_t, index_t& q0, index_t& q1) const { q0 = 0; q1 = Sq; }
  TF_HD int tile(index_t, index_t, index_t, index_t) const { return kTileFull; }
  TF_HD bool allowed(index_t, index_t) const { return true; }
};

/// \brief Band mask (causal and sliding window), FlashAttention's convention.
/// Key j is visible from query i iff -left <= j - (i + Sk - Sq) <= right: the diagonal is
/// bottom-right aligned. left/right < 0 means unbounded; causal is right = 0.
struct BandMask {
  struct Args {
    index_t left;
    index_t right;
  };
  index_t Sq, Sk, off, left, right;

  TF_HD static BandMask make(const Args& a, index_t Sq, index_t Sk) {
    return {Sq, Sk, Sk - Sq, a.left, a.right};
  }
  TF_HD bool allowed(index_t i, index_t j) const {
    const index_t d = j - i - off;
    return (left < 0 || d >= -left) && (right < 0 || d <= right);
  }
  TF_HD void key_range(index_t q0, index_t q1, index_t& k0, index_t& k1) const {
    k0 = left < 0 ? 0 : imax(0, q0 + off - left);
    k1 = right < 0 ? Sk : imin(Sk, q1 - 1 + off + right + 1);
  }
  TF_HD void query_range(index_t k0, index_t k1, index_t& q0, index_t& q1) const {
    q0 = right < 0 ? 0 : imax(0, k0 - off - right);
    q1 = left < 0 ? Sq : imin(Sq, k1 - 1 - off + left + 1);
  }
  TF_HD void row_interval(index_t i, index_t& j0, index_t& j1) const {
    if (left >= 0) j0 = imax(j0, i + off - left);
    if (right >= 0) j1 = imin(j1, i + off + right + 1);
    if (j1 < j0) j1 = j0;
  }
  TF_HD int tile(index_t q0, index_t q1, index_t k0, index_t k1) const {
    // d ranges over [k0 - (q1-1) - off, (k1-1) - q0 - off] inside the tile.
    const index_t dmin = k0 - (q1 - 1) - off, dmax = (k1 - 1) - q0 - off;
    if ((left >= 0 && dmax < -left) || (right >= 0 && dmin > right)) return kTileSkip;
    if ((left < 0 || dmin >= -left) && (right < 0 || dmax <= right)) return kTileFull;
    return kTilePartial;
  }
};

template <class M, class = void>
struct HasRowInterval {
  static constexpr bool value = false;
};
template <class M>
struct HasRowInterval<M, decltype(void(std::declval<const M&>().row_interval(
                             index_t{}, std::declval<index_t&>(), std::declval<index_t&>())))> {
  static constexpr bool value = true;
};

/// \brief Writes `masked` into row[j - k0] for every key j in [k0, k0 + kn) that query i
/// may not see. Used on partial tiles only.
template <class Mask, class T>
TF_HD void mask_row(const Mask& mask, index_t i, index_t k0, index_t kn, T* row, T masked) {
  if constexpr (HasRowInterval<Mask>::value) {
    index_t j0 = k0, j1 = k0 + kn;
    mask.row_interval(i, j0, j1);
    for (index_t j = k0; j < j0; ++j) row[j - k0] = masked;
    for (index_t j = j1; j < k0 + kn; ++j) row[j - k0] = masked;
  } else {
    for (index_t j = 0; j < kn; ++j)
      if (!mask.allowed(i, k0 + j)) row[j] = masked;
  }
}

}  // namespace tilefuse
