//! `HostTensor`: a dense, row-major f32 tensor in host memory — the form every weight takes
//! after loading (whatever its stored dtype or quantisation) and the form logits come back in.

/// A dense row-major f32 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Makes a tensor; panics only on a programming error (data length ≠ product of shape).
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape/data mismatch"
        );
        HostTensor { shape, data }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}
