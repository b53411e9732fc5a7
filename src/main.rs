fn main() {
    println!("selective");
}
