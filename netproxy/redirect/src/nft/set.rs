//! Anonymous constant sets (`{ a, b }` in a rule) and their elements. An
//! interval set (networks) holds ranges as start elements and
//! `NFT_SET_ELEM_INTERVAL_END` elements one past each range, adjacent and
//! overlapping ranges merged, exactly as nft lays them out.

use super::expr::{ANON_SET_NAME, NFTA_DATA_VALUE};
use crate::netlink::msg::Builder;

/// nft datatype ids (nftables `enum datatypes`) of set keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyType {
    Ipv4 = 7,
    Ipv6 = 8,
    InetProto = 12,
    InetService = 13,
}

// enum nft_set_attributes
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_DESC_SIZE: u16 = 1;
// enum nft_set_flags
const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_CONSTANT: u32 = 0x2;
const NFT_SET_INTERVAL: u32 = 0x4;
// enum nft_set_elem_list_attributes / nft_set_elem_attributes
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
// nft's user data (libnftnl `enum nftnl_udata_set_types` and element
// flags): how nft itself reads the set back.
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const UDATA_SET_MERGE_ELEMENTS: u8 = 2;
const UDATA_SET_ELEM_FLAGS: u8 = 1;
const ELEM_F_INTERVAL_OPEN: u32 = 0x1;
const BYTEORDER_HOST: u32 = 1;
const BYTEORDER_BIG_ENDIAN: u32 = 2;

/// Elements per NFT_MSG_NEWSETELEM: the element list is one netlink
/// attribute, at most 64 KiB; an IPv6 interval element takes 48 bytes.
const ELEMENTS_PER_MESSAGE: usize = 1024;

struct Element {
    key: Vec<u8>,
    /// First key past a range.
    end: bool,
    /// A range start that runs to the largest key (no end element).
    open: bool,
}

pub(crate) struct AnonSet {
    /// Batch-local id the rule's lookup refers to.
    pub id: u32,
    key_type: KeyType,
    key_len: u32,
    interval: bool,
    elements: Vec<Element>,
}

impl AnonSet {
    /// A set of single values (all of `key_type`'s length).
    pub fn values(id: u32, key_type: KeyType, keys: Vec<Vec<u8>>) -> AnonSet {
        let key_len = keys.first().map_or(0, Vec::len) as u32;
        AnonSet {
            id,
            key_type,
            key_len,
            interval: false,
            elements: keys
                .into_iter()
                .map(|key| Element {
                    key,
                    end: false,
                    open: false,
                })
                .collect(),
        }
    }

    /// A set of inclusive big-endian ranges `(first, last)`, all of one
    /// length.
    pub fn ranges(id: u32, key_type: KeyType, mut ranges: Vec<(Vec<u8>, Vec<u8>)>) -> AnonSet {
        let key_len = ranges.first().map_or(0, |r| r.0.len());
        ranges.sort();
        // Merge overlapping and adjacent ranges: nft does, and the kernel
        // refuses overlaps.
        let mut merged: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for (lo, hi) in ranges {
            if let Some(last) = merged.last_mut()
                && successor(&last.1).is_none_or(|next| lo <= next)
            {
                if hi > last.1 {
                    last.1 = hi;
                }
                continue;
            }
            merged.push((lo, hi));
        }
        let zero = vec![0u8; key_len];
        let mut elements = Vec::new();
        // The tree needs a closed gap below the first range.
        if merged.first().is_some_and(|(lo, _)| *lo != zero) {
            elements.push(Element {
                key: zero,
                end: true,
                open: false,
            });
        }
        for (lo, hi) in merged {
            let past = successor(&hi);
            elements.push(Element {
                key: lo,
                end: false,
                open: past.is_none(),
            });
            if let Some(key) = past {
                elements.push(Element {
                    key,
                    end: true,
                    open: false,
                });
            }
        }
        AnonSet {
            id,
            key_type,
            key_len: key_len as u32,
            interval: true,
            elements,
        }
    }

    /// NFT_MSG_NEWSET attributes.
    pub fn encode_set(&self, b: &mut Builder, table: &str) {
        let mut flags = NFT_SET_ANONYMOUS | NFT_SET_CONSTANT;
        if self.interval {
            flags |= NFT_SET_INTERVAL;
        }
        b.put_str(NFTA_SET_TABLE, table);
        b.put_str(NFTA_SET_NAME, ANON_SET_NAME);
        b.put_be32(NFTA_SET_FLAGS, flags);
        b.put_be32(NFTA_SET_KEY_TYPE, self.key_type as u32);
        b.put_be32(NFTA_SET_KEY_LEN, self.key_len);
        b.put_be32(NFTA_SET_ID, self.id);
        b.nest(NFTA_SET_DESC, |b| {
            b.put_be32(NFTA_SET_DESC_SIZE, self.elements.len() as u32)
        });
        let order = match self.key_type {
            KeyType::InetProto => BYTEORDER_HOST,
            _ => BYTEORDER_BIG_ENDIAN,
        };
        let mut udata = udata_u32(UDATA_SET_KEYBYTEORDER, order);
        if self.interval {
            udata.extend(udata_u32(UDATA_SET_MERGE_ELEMENTS, 1));
        }
        b.put(NFTA_SET_USERDATA, &udata);
    }

    /// How many NFT_MSG_NEWSETELEM messages the elements take.
    pub fn element_chunks(&self) -> usize {
        self.elements.len().div_ceil(ELEMENTS_PER_MESSAGE)
    }

    /// NFT_MSG_NEWSETELEM attributes for chunk `chunk` of the elements.
    pub fn encode_elements(&self, b: &mut Builder, table: &str, chunk: usize) {
        b.put_str(NFTA_SET_ELEM_LIST_TABLE, table);
        b.put_str(NFTA_SET_ELEM_LIST_SET, ANON_SET_NAME);
        b.put_be32(NFTA_SET_ELEM_LIST_SET_ID, self.id);
        let elements = self
            .elements
            .chunks(ELEMENTS_PER_MESSAGE)
            .nth(chunk)
            .unwrap_or_default();
        b.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
            for e in elements {
                b.nest(NFTA_LIST_ELEM, |b| {
                    if e.end {
                        b.put_be32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
                    }
                    b.nest(NFTA_SET_ELEM_KEY, |b| b.put(NFTA_DATA_VALUE, &e.key));
                    if e.open {
                        b.put(
                            NFTA_SET_ELEM_USERDATA,
                            &udata_u32(UDATA_SET_ELEM_FLAGS, ELEM_F_INTERVAL_OPEN),
                        );
                    }
                });
            }
        });
    }
}

/// One nft user-data TLV (type, length, native-endian u32).
fn udata_u32(ty: u8, v: u32) -> Vec<u8> {
    let mut out = vec![ty, 4];
    out.extend_from_slice(&v.to_ne_bytes());
    out
}

/// The big-endian number one past `key`, or None when `key` is the largest.
fn successor(key: &[u8]) -> Option<Vec<u8>> {
    let mut next = key.to_vec();
    for byte in next.iter_mut().rev() {
        if *byte == 0xff {
            *byte = 0;
        } else {
            *byte += 1;
            return Some(next);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(set: &AnonSet) -> Vec<(Vec<u8>, bool, bool)> {
        set.elements
            .iter()
            .map(|e| (e.key.clone(), e.end, e.open))
            .collect()
    }

    #[test]
    fn ranges_are_merged_and_closed_like_nft_does() {
        // { 10.0.0.1/32, 10.0.0.2/32 } is one range 10.0.0.1-10.0.0.2.
        let set = AnonSet::ranges(
            1,
            KeyType::Ipv4,
            vec![
                (vec![10, 0, 0, 2], vec![10, 0, 0, 2]),
                (vec![10, 0, 0, 1], vec![10, 0, 0, 1]),
            ],
        );
        assert_eq!(
            layout(&set),
            [
                (vec![0, 0, 0, 0], true, false),
                (vec![10, 0, 0, 1], false, false),
                (vec![10, 0, 0, 3], true, false),
            ]
        );
        // A range from zero needs no leading end; one to the top is open.
        let set = AnonSet::ranges(
            1,
            KeyType::Ipv4,
            vec![
                (vec![0, 0, 0, 0], vec![0, 255, 255, 255]),
                (vec![255, 0, 0, 0], vec![255, 255, 255, 255]),
            ],
        );
        assert_eq!(
            layout(&set),
            [
                (vec![0, 0, 0, 0], false, false),
                (vec![1, 0, 0, 0], true, false),
                (vec![255, 0, 0, 0], false, true),
            ]
        );
    }

    #[test]
    fn successor_carries_and_stops_at_the_top() {
        assert_eq!(successor(&[0, 0xff]), Some(vec![1, 0]));
        assert_eq!(successor(&[0xff, 0xff]), None);
    }
}
