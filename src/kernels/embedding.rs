//! Embedding lookup and its backward: h[row] = E[ids[row]] and
//! dE[ids[row]] += dh[row]. E is (V, D) row-major, h and dh are (rows, D).
//! Ids are checked by the callers (they know the vocabulary's name).

/// h = E[ids]  (rows, D)
pub fn embedding_forward<T: Copy>(table: &[T], ids: &[u32], d: usize) -> Vec<T> {
    let mut h = Vec::with_capacity(ids.len() * d);
    for &id in ids {
        let row = id as usize * d;
        h.extend_from_slice(&table[row..row + d]);
    }
    h
}

/// d_table[ids[row]] += d_h[row] for every row (a token seen twice adds twice).
pub fn embedding_backward<T: Copy + std::ops::AddAssign>(
    ids: &[u32],
    d_h: &[T],
    d: usize,
    d_table: &mut [T],
) {
    for (row, &id) in ids.iter().enumerate() {
        let dst = &mut d_table[id as usize * d..(id as usize + 1) * d];
        for (a, &b) in dst.iter_mut().zip(&d_h[row * d..(row + 1) * d]) {
            *a += b;
        }
    }
}
